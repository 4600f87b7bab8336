"""compress end to end on a tiny model, and every bad input: one-line error, exit code != 0, no output."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from llmopt.cli import main
from llmopt.compression import REPORT_FILE, compress
from llmopt.evaluation import evaluate

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_recipe(tmp_path, stages, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump({"stages": stages}))
    return str(p)


def test_magnitude_50_exact_and_reloads(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "mag50"
    res = compress(str(tiny_model_dir), "configs/magnitude-50.yaml", out)
    model = AutoModelForCausalLM.from_pretrained(out)
    n = 0
    for name, mod in model.named_modules():
        if name.endswith(LINEAR_SUFFIXES):
            w = mod.weight
            assert int((w == 0).sum()) == round(0.5 * w.numel()), name
            n += 1
    assert n == 2 * 7
    # lm_head / embeddings untouched
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["stages"]["0:magnitude"]["sparsity"] == pytest.approx(0.5)
    assert report["peak_rss_mib"] > 0 and res.report["linears"][0]["sparsity"] == pytest.approx(0.5)
    phases = report["peak_rss_mib_by_phase"]
    assert {"load", "stages", "save"} <= set(phases) and max(phases.values()) <= report["peak_rss_mib"] + 1
    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["sparsity"] == 0.5
    assert not list(tmp_path.glob(".mag50.tmp-*"))


def test_rtn_8bit_has_lower_kl_than_4bit(tiny_model_dir, tiny_text_file, tmp_path):
    kl = {}
    for bits in (4, 8):
        out = tmp_path / f"rtn{bits}"
        recipe = write_recipe(
            tmp_path, [{"stage": "rtn", "format": "int", "bits": bits, "group_size": 32}], f"{bits}.yaml"
        )
        compress(str(tiny_model_dir), recipe, out)
        r = evaluate(
            str(out),
            data=f"text:{tiny_text_file}",
            seq_len=64,
            max_windows=3,
            base=str(tiny_model_dir),
            progress=False,
        )
        kl[bits] = r.kl.mean
    assert 0 < kl[8] < kl[4]


def run_cli(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize(
    "stage, expect",
    [
        ({"stage": "magnitude", "sparsty": 0.5}, "unknown key 'sparsty'"),
        ({"stage": "magnitude", "sparsity": 1.0}, "sparsity must be in [0, 1)"),
        ({"stage": "magnitude", "sparsity": -0.2}, "sparsity must be in [0, 1)"),
        ({"stage": "rtn", "format": "int", "bits": 1}, "bits must be in 2..8"),
        ({"stage": "rtn", "format": "int", "bits": 9}, "bits must be in 2..8"),
        ({"stage": "rtn", "format": "int", "bits": 4, "group_size": 128}, "group size 128 does not divide"),
        ({"stage": "magnitude", "pattern": "2:3"}, "does not divide the input width"),
        ({"stage": "sparsegpt", "pattern": "4:4"}, "N:M needs 1 <= N < M"),
        ({"stage": "sparsegpt", "pattern": "2:6"}, "does not divide the input width"),
        ({"stage": "wanda", "sparsity": 1.0}, "sparsity must be in [0, 1)"),
        ({"stage": "gptq", "format": "q4_0", "act_order": True, "static_groups": False}, "needs static_groups"),
    ],
)
def test_bad_recipe_inputs(tiny_model_dir, tmp_path, capsys, stage, expect):
    out = tmp_path / "out"
    rc, err = run_cli(
        ["compress", str(tiny_model_dir), "--recipe", write_recipe(tmp_path, [stage]), "--output", str(out)],
        capsys,
    )
    assert rc != 0 and expect in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_unknown_model(tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run_cli(
        [
            "compress",
            str(tmp_path / "no-such-model"),
            "--recipe",
            "configs/magnitude-50.yaml",
            "--output",
            str(out),
        ],
        capsys,
    )
    assert rc != 0 and "no-such-model" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_existing_output_refused_then_overwritten(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    rc, err = run_cli(
        ["compress", str(tiny_model_dir), "--recipe", "configs/magnitude-50.yaml", "--output", str(out)],
        capsys,
    )
    assert rc != 0 and "--overwrite" in err and len(err.splitlines()) == 1
    assert (out / "keep.txt").read_text() == "user data"
    rc, _ = run_cli(
        [
            "compress",
            str(tiny_model_dir),
            "--recipe",
            "configs/magnitude-50.yaml",
            "--output",
            str(out),
            "--overwrite",
        ],
        capsys,
    )
    assert rc == 0 and (out / REPORT_FILE).exists() and not (out / "keep.txt").exists()


def test_cli_subprocess_error_is_one_line(tmp_path):
    """The installed entry point itself: exit code 2 and a single 'error:' line, no traceback."""
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmopt.cli",
            "compress",
            "bundled:nope",
            "--recipe",
            "configs/magnitude-50.yaml",
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "o").exists()


def test_model_without_recognised_decoder_layers():
    """A model with no ModuleList of num_hidden_layers blocks holding Linears is refused with one line
    naming the data-free stages (GPT-2's Conv1D blocks are recognised: tests/test_archs.py)."""
    from torch import nn

    from llmopt.calibration import find_decoder_layers
    from llmopt.errors import LLMOptError

    class Flat(nn.Module):  # Linears directly on the model, no layer list
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2})()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    with pytest.raises(LLMOptError, match="cannot find the decoder layers of Flat.*magnitude, rtn") as e:
        find_decoder_layers(Flat())
    assert "\n" not in str(e.value)


def test_phase_sampler_attributes_memory_to_its_phase():
    import time

    from llmopt.memory import PhaseSampler, phase, rss_mib

    if rss_mib() is None:
        pytest.skip("no /proc/self/statm")
    with PhaseSampler(interval=0.01) as s:
        with phase("small"):
            time.sleep(0.05)
        with phase("big"):
            x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
            time.sleep(0.05)
            del x
    assert s.peaks["big"] > s.peaks["small"] + 48
    with phase("nothing active"):  # a no-op without a sampler
        pass


def test_release_freed_memory_returns_heap_blocks_to_the_os():
    """In a fresh process (as `llmopt compress` runs): glibc keeps freed 16 MiB blocks on the heap once its
    dynamic mmap threshold has risen (what the engine relies on for speed); release_freed_memory, which the
    engine calls after each statistics pass and each layer, hands them back."""
    import subprocess
    import sys

    from llmopt.memory import _LIBC, rss_mib

    if _LIBC is None or rss_mib() is None:
        pytest.skip("glibc and /proc only")
    code = """
import torch
from llmopt.memory import release_freed_memory, rss_mib
x = torch.ones(16 * 2**20 // 4); del x  # the first big block is mmapped; freeing it raises the threshold
before = rss_mib()
xs = [torch.ones(16 * 2**20 // 4) for _ in range(3)]; del xs  # a layer's activations, on the heap now
kept = rss_mib() - before
release_freed_memory()
print(kept, rss_mib() - before)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    kept, trimmed = map(float, p.stdout.split())
    assert kept > 12 and trimmed < 2, (kept, trimmed)  # glibc may trim some of the heap's top by itself
