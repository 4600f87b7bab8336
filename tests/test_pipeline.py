"""The whole loop on a tiny random Llama: compress → GGUF + ONNX exports → evaluation of every artifact
against the input model → report.json / report.md / report.png / model card; `llmopt report` over runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmopt.cli import main
from llmopt.pipeline import PipelineOptions, compare, load_report, run_pipeline

HARNESS_TASKS = Path(__file__).parent / "data" / "harness"
RECIPE = {
    "name": "tiny-rtn-q4_0",
    "calibration": {"data": "self:4", "samples": 4, "seq_len": 64, "seed": 0},
    "stages": [{"stage": "rtn", "format": "q4_0"}],
}


@pytest.fixture(scope="module")
def run(tiny_model_dir, tiny_text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "run-q4_0"
    opts = PipelineOptions(
        export=("gguf", "onnx"),
        eval=True,
        eval_data=f"text:{tiny_text_file}#0.5:1",
        eval_seq_len=64,
        eval_windows=4,
        speed=True,
        threads=1,
        harness_tasks="llmopt_tiny_mc",
        harness_include_path=str(HARNESS_TASKS),
    )
    report = run_pipeline(str(tiny_model_dir), RECIPE, out, opts, progress=False)
    return out, report


def test_artifacts_report_and_card(run):
    from huggingface_hub import ModelCard

    out, report = run
    for name in ("config.json", "model.gguf", "onnx/model.onnx", "report.json", "report.md", "report.png"):
        assert (out / name).is_file(), name
    assert (out / "README.md").is_file()
    assert [r["artifact"] for r in report["rows"]] == ["input", "transformers", "gguf", "onnx", "baseline"]
    assert report["output"] == out.name  # the run's name in `llmopt report` tables, not an artifact's
    assert load_report(out) == json.loads((out / "report.json").read_text())
    rows = {r["artifact"]: r for r in report["rows"]}
    # the same stored q4_0 codes in every runtime: torch, llama.cpp and ONNX Runtime agree on perplexity
    t, g, o = rows["transformers"], rows["gguf"], rows["onnx"]
    assert abs(o["perplexity"] / t["perplexity"] - 1) < 1e-3  # MatMulNBits from the codes, float32
    assert abs(g["perplexity"] / t["perplexity"] - 1) < 2e-2  # llama.cpp: f16 KV cache, its own kernels
    assert o["kl"] == pytest.approx(t["kl"], rel=0.05, abs=1e-4) and t["kl"] > 0
    assert rows["input"]["kl"] == 0.0 and rows["input"]["perplexity"] > 1
    assert g["bits_per_weight"] == pytest.approx(4.5, abs=0.01)  # q4_0: 18 bytes per 32 weights
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in report["rows"])
    assert g["size_bytes"] == (out / "model.gguf").stat().st_size
    card = ModelCard.load(out / "README.md")
    assert "llmopt" in card.data.tags
    # evaluated on a local text file: the card's table only (this model's artifacts and the input model as a
    # reference row), no model-index (it names Hub data sets)
    assert card.data.eval_results is None and "model-index" not in (out / "README.md").read_text()
    assert all(f"| {rows[n]['perplexity']:.3f} |" in card.text for n in ("transformers", "gguf", "onnx", "input"))
    assert "input model (reference)" in card.text
    # nothing pushed: "How to run" loads from the output folder itself
    assert f"llama-cli -m {out}/model.gguf" in card.text and f"\nllmopt eval {out} --data wikitext2" in card.text
    assert f'ORTModelForCausalLM.from_pretrained("{out}/onnx")' in card.text and "local/" not in card.text
    for name in ("input", "transformers", "gguf", "onnx"):
        ev = json.loads((out / "eval" / f"{name}.json").read_text())
        assert ev["perplexity"] == rows[name]["perplexity"]
    # lm-eval on every artifact: the same stored codes give the same accuracy everywhere
    acc = {h["artifact"]: h for h in report["harness"] if h["metric"] == "acc"}
    assert set(acc) == {"transformers", "gguf", "onnx"}
    assert abs(acc["gguf"]["value"] - acc["transformers"]["value"]) <= acc["transformers"]["stderr"] + 1e-9
    assert acc["onnx"]["value"] == pytest.approx(acc["transformers"]["value"], abs=1e-9)
    assert (out / "harness" / "gguf.json").is_file()
    md = (out / "report.md").read_text()
    assert "| transformers |" in md and "| gguf |" in md and "| onnx |" in md


def test_baseline_row_is_llama_cpp_on_the_same_windows(run):
    """--eval adds llama.cpp's own quantization of the input at the recipe's file type (q4_0, with an
    importance matrix from the recipe's calibration windows), evaluated like every artifact, compared with each
    in report.json / report.md / the card, kept out of the card's model-index and out of the harness."""
    import gguf

    out, report = run
    rows = {r["artifact"]: r for r in report["rows"]}
    b = rows["baseline"]
    path = out / "baseline" / "llama.cpp-q4_0-imatrix.gguf"
    assert b["role"] == "baseline" and b["path"] == "baseline/llama.cpp-q4_0-imatrix.gguf" and path.is_file()
    assert b["size_bytes"] == path.stat().st_size and b["perplexity"] > 1 and b["kl"] > 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0"
    vs = report["baseline"]["vs"]
    assert set(vs) == {"transformers", "gguf", "onnx"}
    g = vs["gguf"]
    assert g["d_perplexity"] == pytest.approx(rows["gguf"]["perplexity"] - b["perplexity"])
    assert g["d_kl"] == pytest.approx(rows["gguf"]["kl"] - b["kl"])
    assert g["size_ratio"] == pytest.approx(rows["gguf"]["size_bytes"] / b["size_bytes"])
    assert "Beside llama.cpp's own quantizer" in (out / "report.md").read_text()
    card = (out / "README.md").read_text()
    assert "Beside llama.cpp's own quantizer" in card and "(baseline: llama.cpp's own quantizer)" in card
    assert {h["artifact"] for h in report["harness"]} == {"transformers", "gguf", "onnx"}
    steps = json.loads((out / "pipeline.json").read_text())["steps"]
    assert {"export_gguf", "export_onnx", "baseline", "eval_input", "eval_baseline"} <= set(steps)


def test_report_compares_runs(run, tmp_path, capsys):
    out, report = run
    other = tmp_path / "copy"
    import shutil

    shutil.copytree(out, other)
    png = tmp_path / "cmp.png"
    assert main(["report", str(out), str(other), "--output", str(png)]) == 0
    text = capsys.readouterr().out
    assert text.count("(input model)") == 1  # the reference row once, however many runs
    assert text.count("| run-q4_0 |") == 4 and text.count("| copy |") == 4  # 3 artifacts + its baseline
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table, path = compare([str(out)], output=str(tmp_path / "one.png"))
    assert path and "gguf" in table


def test_pareto_front():
    from llmopt.pipeline.report import pareto

    # (size, ppl): the 3rd is dominated by the 2nd (bigger and worse)
    assert pareto([(1, 10), (2, 5), (3, 6), (4, 4)]) == [True, True, False, True]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--export", "tflite"], "unknown --export target 'tflite'"),
        (["--eval", "--eval-data", "text:/nonexistent/file.txt"], "/nonexistent/file.txt"),
        (["--harness", "x", "--harness-include-path", "/nonexistent"], "is not a folder of task YAMLs"),
        (["--push-to-hub", "not a repo"], "repo"),
    ],
)
def test_bad_pipeline_options_fail_before_any_work(tiny_model_dir, tmp_path, args, message):
    out = tmp_path / "o"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmopt.cli",
            "compress",
            str(tiny_model_dir),
            "--recipe",
            "rtn-q4_0",
            "--output",
            str(out),
        ]
        + args,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, r.stderr
    assert not out.exists()


def test_report_of_a_folder_without_one(tmp_path):
    from llmopt.errors import LLMOptError

    with pytest.raises(LLMOptError, match="has no report.json"):
        load_report(tmp_path)


def test_evaluation_settings_come_from_the_recipe_unless_given():
    from llmopt.recipe import parse_recipe

    rec = parse_recipe({**RECIPE, "evaluation": {"data": "self:2", "seq_len": 128, "windows": 3}})
    o = PipelineOptions(eval=True).with_recipe(rec)
    assert (o.eval_data, o.eval_seq_len, o.eval_windows) == ("self:2", 128, 3)
    o = PipelineOptions(eval=True, eval_data="wikitext2", eval_windows=5).with_recipe(rec)
    assert (o.eval_data, o.eval_seq_len, o.eval_windows) == ("wikitext2", 128, 5)  # the command line wins
    o = PipelineOptions(eval=True).with_recipe(parse_recipe(RECIPE))  # no section: the defaults
    assert (o.eval_data, o.eval_seq_len, o.eval_windows) == ("wikitext2", 2048, 8)
    assert parse_recipe(RECIPE).evaluation.windows == 8


def test_quickstart_runs_offline_on_the_local_text():
    """The README's main command names no data: the quickstart recipe's calibration, distillation and
    evaluation data are the local WikiText-2 text (first half / second half), never the Hub."""
    from llmopt.data import parse_data_spec
    from llmopt.recipe import parse_recipe

    for name, stages in (("quickstart", ["gptq"]), ("tour", ["sparsegpt", "gptq", "distill"])):
        rec = parse_recipe(name)
        cal, ev = parse_data_spec(rec.calibration.data), parse_data_spec(rec.evaluation.data)
        assert cal.kind == ev.kind == "text" and cal.path == ev.path
        assert cal.fraction == (0.0, 0.5) and ev.fraction == (0.5, 1.0)
        assert [s.stage for s in rec.stages] == stages
        assert all(s.data is None for s in rec.stages if s.stage == "distill")  # trains on the calibration text
    # the main job runs the shipped GPTQ q4_0 defaults, exactly as the gptq-q4_0 recipe does
    quick, shipped = parse_recipe("quickstart").stages[0], parse_recipe("gptq-q4_0").stages[0]
    assert quick == shipped
