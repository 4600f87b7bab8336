"""The distill stage on the tiny random Llama (seconds each): losses, masks, QAT codes, resume, CLI.

Properties: the loss kernels are the divergences they name (zero on equal distributions, top-k buckets a
lower bound of the full KL); distillation lowers the KL to the teacher on held-out text; pruned weights
stay exactly zero (the very same positions, N:M exact); QAT codes stay on the format's grid, the saved
weights equal dequantize(codes) bit for bit and the GGUF / ONNX exports hold those codes; a run killed
after a checkpoint and resumed ends where an uninterrupted run ends (bit-identical weights on CPU; the
test allows 1e-6 absolute); gradual sparsity reaches its target without reviving a pruned weight; bad
inputs fail in one line before any model is loaded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from llmopt.compression import REPORT_FILE, compress
from llmopt.errors import LLMOptError
from llmopt.kernels.distill import (
    divergence,
    logit_distill_loss,
    squarehead_loss,
    student_buckets,
    teacher_buckets,
    topk_summary,
)

RESUME_ATOL = 1e-6  # resumed vs uninterrupted final weights (identical in practice on CPU)
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """The teacher cache of these tests lives in one temporary llmopt cache for the session."""
    root = tmp_path_factory.getbasetemp() / "llmopt-cache"
    monkeypatch.setenv("LLMOPT_CACHE", str(root))


def distill_entry(**kw) -> dict:
    base = dict(
        stage="distill",
        seq_len=64,
        heldout_windows=4,
        batch_size=2,
        grad_accum=2,
        max_tokens=64 * 4 * 12,
        max_minutes=None,
        lr=1e-3,
        warmup=0.1,
        eval_every=4,
        top_k=32,
    )
    return {**base, **kw}


def recipe(tiny_text_file, *stages) -> dict:
    return {
        "calibration": {"data": f"text:{tiny_text_file}#0:0.5", "samples": 8, "seq_len": 64},
        "stages": list(stages),
    }


def load_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# --- kernels ----------------------------------------------------------------------------------------


def test_divergences_on_full_and_topk_buckets():
    g = torch.Generator().manual_seed(0)
    zt, zs = torch.randn(6, 50, generator=g) * 3, torch.randn(6, 50, generator=g) * 3
    p, q = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
    manual = (p.exp() * (p - q)).sum(-1)
    assert torch.allclose(divergence("forward_kl", p, q), manual, atol=1e-6)
    assert torch.allclose(divergence("reverse_kl", p, q), (q.exp() * (q - p)).sum(-1), atol=1e-6)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert divergence(kind, p, p).abs().max() < 1e-6
        assert (divergence(kind, p, q) > 0).all()
    assert (divergence("jsd", p, q, beta=0.5) <= np.log(2) + 1e-6).all()  # JSD is bounded by log 2

    top, index, lse, tail = topk_summary(zt, 8, T=2.0)
    tb = teacher_buckets(top, lse, tail, T=2.0)
    assert torch.allclose(tb.exp().sum(-1), torch.ones(6), atol=1e-5)  # k tokens + tail = a distribution
    sb = student_buckets(zs, index, T=2.0)
    assert torch.allclose(sb.exp().sum(-1), torch.ones(6), atol=1e-5)
    full = divergence("forward_kl", torch.log_softmax(zt / 2, -1), torch.log_softmax(zs / 2, -1))
    coarse = divergence("forward_kl", tb, sb)
    assert (coarse <= full + 1e-5).all()  # coarsening never increases a KL (data processing)
    assert float(logit_distill_loss(zt, tb, index, "forward_kl", 2.0)) < 1e-4  # teacher vs itself
    assert torch.allclose(logit_distill_loss(zs, tb, index, "forward_kl", 2.0), coarse.sum() * 4)


def test_squarehead_is_normalised_per_layer():
    h = [torch.randn(2, 5, 8), 100 * torch.randn(2, 5, 8)]
    assert float(squarehead_loss(h, h)) == 0.0
    noisy = [x * 1.1 for x in h]  # 10% error on each layer, whatever its scale
    assert float(squarehead_loss(noisy, h)) == pytest.approx(2 * 0.01, rel=1e-4)


def test_fake_quant_is_the_formats_grid_with_a_straight_through_gradient():
    from llmopt.core.state import QuantizedLinear
    from llmopt.distill.fakequant import FakeQuant
    from llmopt.formats import make_format, rtn_quantize

    W = torch.randn(8, 64)
    for fmt in (make_format("int", bits=4, group_size=32), make_format("q4_0"), make_format("q4_1")):
        q = rtn_quantize(W, fmt)
        fq = FakeQuant(QuantizedLinear(q.codes, q.qparams, fmt), None, learn_scales=True)
        latent = q.weight.clone().requires_grad_(True)
        out = fq(latent)
        assert torch.equal(out.detach(), fmt.fake_quantize(q.weight, q.qparams.on_grid()))
        out.sum().backward()
        assert torch.equal(latent.grad, torch.ones_like(W))  # on-grid values are inside the range
        assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0
        clipped = fq(torch.full_like(W, 100.0))  # far outside every group's range: no gradient
        x = torch.full_like(W, 100.0, requires_grad=True)
        fq(x).sum().backward()
        assert float(x.grad.abs().sum()) == 0.0 and clipped.abs().max() < 100


# --- the stage on the tiny model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def magnitude_runs(tiny_model_dir, tiny_text_file, tmp_path_factory):
    """magnitude 50% alone, and followed by distill (same masks: magnitude is deterministic)."""
    root = tmp_path_factory.mktemp("distill")
    mag = {"stage": "magnitude", "sparsity": 0.5}
    with pytest.MonkeyPatch.context() as mp:  # the autouse cache fixture is function-scoped
        mp.setenv("LLMOPT_CACHE", str(tmp_path_factory.getbasetemp() / "llmopt-cache"))
        a = compress(str(tiny_model_dir), recipe(tiny_text_file, mag), root / "mag")
        b = compress(str(tiny_model_dir), recipe(tiny_text_file, mag, distill_entry()), root / "mag-distill")
    return root, a, b


def test_distillation_lowers_kl_and_keeps_masks(magnitude_runs, tiny_model_dir, tiny_text_file):
    from llmopt.evaluation import evaluate

    root, _, res = magnitude_runs
    kl = {}
    for name in ("mag", "mag-distill"):
        r = evaluate(
            str(root / name), data=f"text:{tiny_text_file}#0.5:1", seq_len=64, max_windows=8, base=str(tiny_model_dir)
        )
        kl[name] = r.kl.mean
    assert kl["mag-distill"] < 0.9 * kl["mag"], kl
    d = res.report["model_stages"]["1:distill"]
    before, after = d["heldout_before"]["kl_topk_bound"], d["heldout_after"]["kl_topk_bound"]
    assert after < before and d["masks_exact"] and d["masked_linears"] == 14
    assert d["tokens"] == 64 * 4 * 12 and d["steps"] == 12 and d["stopped_by"] == "tokens"

    before, after = load_weights(root / "mag"), load_weights(root / "mag-distill")
    n = 0
    for k, w in after.items():
        if k.endswith(tuple(s + ".weight" for s in LINEAR_SUFFIXES)):
            assert torch.equal(w == 0, before[k] == 0), k  # the very same pruned positions, exactly zero
            assert not torch.equal(w, before[k]), k  # and the kept weights were trained
            n += 1
    assert n == 14
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # frozen
    curve = json.loads((root / "mag-distill" / "distill_curve.json").read_text())
    assert len(curve["train"]) == 12 and [h["step"] for h in curve["heldout"]] == [0, 4, 8, 12]
    assert (root / "mag-distill" / "distill_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not (root / "mag-distill.ckpt").exists()  # checkpoints removed once the output is saved
    report = json.loads((root / "mag-distill" / REPORT_FILE).read_text())
    assert report["stages"]["1:distill"]["sparsity"] == pytest.approx(0.5)


def test_teacher_cache_is_reused(magnitude_runs, tiny_model_dir, tiny_text_file, tmp_path):
    """A rerun (another output, another student) computes no teacher logits: every window is cached."""
    from llmopt.distill import teacher as teacher_mod

    calls = []
    real = teacher_mod.TopKCache.fill

    def spy(self, model, windows, chunk_tokens=512):
        calls.append(len(self.missing(windows)))
        return real(self, model, windows, chunk_tokens)

    teacher_mod.TopKCache.fill = spy
    try:
        entry = {"stage": "magnitude", "sparsity": 0.3}
        compress(
            str(tiny_model_dir), recipe(tiny_text_file, entry, distill_entry(max_tokens=64 * 4 * 2)), tmp_path / "o"
        )
    finally:
        teacher_mod.TopKCache.fill = real
    assert calls == [0]


def test_sparsegpt_gptq_distill_cli_exports_gguf_and_onnx(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    """sparsegpt 2:4 → gptq q4_0 → distill (QAT) from the CLI; the output exports like any other."""
    from llmopt.cli import main
    from llmopt.exporters.gguf.codes import load_stored

    stages = [
        {"stage": "sparsegpt", "pattern": "2:4"},
        {"stage": "gptq", "format": "q4_0"},
        distill_entry(learn_scales=True, scale_lr=1e-3, ce_weight=0.1, max_tokens=64 * 4 * 6),  # scales move codes
    ]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_text_file, *stages)))
    out = tmp_path / "sg-gptq-distill"
    assert main(["compress", str(tiny_model_dir), "--recipe", str(path), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stage 2:distill" in printed and "held-out top-32 bucket KL bound" in printed

    full_report = json.loads((out / REPORT_FILE).read_text())
    report = full_report["model_stages"]["2:distill"]
    assert report["qat_linears"] == 14 and report["masks_exact"]
    per_linear = {r["linear"]: r for r in full_report["linears"] if r["stage"] == "distill"}
    stored, weights = load_stored(out), load_weights(out)
    changed = 0
    for name, s in stored.items():
        w = weights[name + ".weight"]
        deq = s.dequantize()
        assert torch.equal(deq.view(torch.int32), w.view(torch.int32)), name  # saved weight == codes, bit for bit
        assert int(s.codes.min()) >= 0 and int(s.codes.max()) <= 15  # q4_0 codes on the grid
        assert torch.equal(s.qp.scale, s.qp.scale.half().float())  # learned scales stored as fp16
        zeros = (w == 0).view(w.shape[0], -1, 4).sum(-1)
        assert bool((zeros >= 2).all()), name  # 2:4 kept (q4_0 has an exact 0)
        changed += per_linear[name]["codes_changed"] > 0
    assert changed > 0  # QAT moved codes

    gguf_path = tmp_path / "m.gguf"
    assert main(["export", str(out), "--to", "gguf", "--output", str(gguf_path), "--embedding-type", "f32"]) == 0
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    from llmopt.exporters.gguf import unpermute_qk

    cfg = json.loads((out / "config.json").read_text())
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}
    for name, s in stored.items():
        t = tensors[tmap.get_name(name + ".weight", try_suffixes=(".weight",))]
        raw = np.asarray(t.data)
        heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}.get(name[-6:])
        if heads:
            raw = unpermute_qk(raw, heads)
        assert np.array_equal(dequantize(raw, t.tensor_type), weights[name + ".weight"].numpy()), name
        assert torch.equal(s.fmt.from_gguf_blocks(raw)[0], s.codes), name

    pytest.importorskip("optimum.exporters.onnx")
    from llmopt.exporters import export_onnx

    r = export_onnx(str(out), str(tmp_path / "onnx"), quant="auto")
    assert r["matmul_nbits"] == r["linears_exact"] == 14


def _final_linears(folder) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_weights(folder).items() if k.endswith(".weight")}


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    """An exception after the step-4 checkpoint; the rerun with resume=True continues from step 4 and
    ends with the uninterrupted run's weights (same seed)."""
    from llmopt.distill import loop

    stages = [
        {"stage": "wanda", "pattern": "2:4"},
        distill_entry(max_tokens=64 * 4 * 8, checkpoint_every=2, checkpoint_minutes=None),
    ]
    full = compress(str(tiny_model_dir), recipe(tiny_text_file, *stages), tmp_path / "full")

    real = loop.batch_windows

    def failing(n_train, seed, step, *a):
        if step == 5:
            raise RuntimeError("injected failure")
        return real(n_train, seed, step, *a)

    monkeypatch.setattr(loop, "batch_windows", failing)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="injected"):
        compress(str(tiny_model_dir), recipe(tiny_text_file, *stages), out)
    ckpt = tmp_path / "resumed.ckpt"
    assert json.loads((ckpt / "latest.json").read_text())["checkpoint"] == "step-0000004" and not out.exists()
    monkeypatch.setattr(loop, "batch_windows", real)
    res = compress(str(tiny_model_dir), recipe(tiny_text_file, *stages), out, resume=True)
    d = res.report["model_stages"]["1:distill"]
    assert d["resumed_from_step"] == 4 and d["steps"] == 8 and not ckpt.exists()
    a, b = _final_linears(tmp_path / "full"), _final_linears(out)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=RESUME_ATOL), (k, float((a[k] - b[k]).abs().max()))
    fa = full.report["model_stages"]["1:distill"]["heldout_after"]
    assert d["heldout_after"]["kl_topk_bound"] == pytest.approx(fa["kl_topk_bound"], abs=1e-6)


def test_sigkill_then_cli_resume(tiny_model_dir, tiny_text_file, tmp_path):
    """The CLI in a subprocess, SIGKILLed once a checkpoint exists; the same command (with --resume)
    finishes from it: the output appears only then, and the checkpoint folder is gone."""
    steps = 16
    stages = [
        {"stage": "magnitude", "sparsity": 0.5},
        distill_entry(max_tokens=64 * 4 * steps, checkpoint_every=2, checkpoint_minutes=None, eval_every=1000),
    ]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_text_file, *stages)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "llmopt.cli", "compress", str(tiny_model_dir), "--recipe", str(path)]
    cmd += ["--output", str(out), "--resume"]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        latest = tmp_path / "out.ckpt" / "latest.json"
        deadline = time.time() + 300  # generous: a loaded 2-core machine starts Python slowly
        while not latest.exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.02)
        assert p.poll() is None, log.read_text()[-2000:]
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert latest.exists() and not out.exists()
    step = int(json.loads(latest.read_text())["checkpoint"].split("-")[1])
    assert 0 < step < steps
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    d = json.loads((out / REPORT_FILE).read_text())["model_stages"]["1:distill"]
    assert d["resumed_from_step"] >= step and d["steps"] == steps
    assert not (tmp_path / "out.ckpt").exists()


def test_gradual_sparsity_reaches_its_target_without_regrowth(tiny_model_dir, tiny_text_file, tmp_path):
    stages = [
        {"stage": "magnitude", "sparsity": 0.5},
        distill_entry(gradual={"target": 0.7, "start": 0.0, "end": 0.5, "updates": 3, "score": "wanda"}),
    ]
    res = compress(str(tiny_model_dir), recipe(tiny_text_file, *stages), tmp_path / "g")
    one_shot = compress(str(tiny_model_dir), recipe(tiny_text_file, stages[0]), tmp_path / "m")
    assert res.report["model_stages"]["1:distill"]["gradual_sparsity"] == pytest.approx(0.7, abs=0.01)
    a, b = load_weights(tmp_path / "g"), load_weights(tmp_path / "m")
    for k, w in a.items():
        if k.endswith(tuple(s + ".weight" for s in LINEAR_SUFFIXES)):
            assert float((w == 0).float().mean()) == pytest.approx(0.7, abs=0.01), k
            assert bool((w[b[k] == 0] == 0).all()), k  # every weight pruned at 50% is still pruned
    assert one_shot.report["stages"]["0:magnitude"]["sparsity"] == pytest.approx(0.5)


def test_full_logits_live_teacher_hidden_loss_and_jsd(tiny_model_dir, tiny_text_file, tmp_path):
    """top_k: null (full logits from a live teacher copy) with SquareHead and the generalized JSD."""
    entry = distill_entry(top_k=None, loss="jsd", beta=0.3, hidden_weight=0.5, max_tokens=64 * 4 * 4, eval_every=2)
    res = compress(
        str(tiny_model_dir), recipe(tiny_text_file, {"stage": "magnitude", "sparsity": 0.5}, entry), tmp_path / "o"
    )
    d = res.report["model_stages"]["1:distill"]
    assert d["heldout_after"]["loss"] < d["heldout_before"]["loss"]
    curve = json.loads((tmp_path / "o" / "distill_curve.json").read_text())
    assert all("hidden" in r and "kl" in r for r in curve["train"])


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_other_architectures(arch, tiny_model_dir, tiny_text_file, tmp_path):
    """Conv1D weights stored (in, out) and dropout (gpt2), final logit soft-capping and sliding-window
    layers (gemma2): pruned + int4 QAT students keep masks and codes."""
    from transformers import AutoTokenizer

    from llmopt.exporters.gguf.codes import load_stored
    from tests.tiny_archs import save_tiny_model

    folder = tmp_path / arch
    save_tiny_model(arch, folder, AutoTokenizer.from_pretrained(tiny_model_dir))
    stages = [
        {"stage": "magnitude", "sparsity": 0.5},
        {"stage": "rtn", "format": "int", "bits": 4, "group_size": 32},
        distill_entry(max_tokens=64 * 4 * 2, eval_every=2),
    ]
    res = compress(str(folder), recipe(tiny_text_file, *stages), tmp_path / "o")
    d = res.report["model_stages"]["2:distill"]
    assert d["masks_exact"] and d["qat_linears"] == d["masked_linears"] > 0
    assert d["heldout_after"]["loss"] < d["heldout_before"]["loss"]
    weights = load_weights(tmp_path / "o")
    for name, s in load_stored(tmp_path / "o").items():
        w = weights[name + ".weight"]
        w = w.t() if s.transposed else w
        assert torch.equal(s.dequantize(), w), name


@pytest.mark.parametrize(
    "entry, stages_before, expect",
    [
        ({"data": "text:/no/such/file.txt"}, [], "text file not found"),
        ({"teacher": "/no/such/teacher"}, [], "no such file or folder: /no/such/teacher"),
        ({"gradual": {"target": 0.7}}, [{"stage": "rtn", "format": "q4_0"}], "gradual sparsity prunes float weights"),
        ({"gradual": {"target": 0.7, "start": 0.5, "end": 0.4}}, [], "must be after gradual.start"),
        ({"loss": "kl"}, [], "loss"),
        ({"loss_weight": 0}, [], "nothing to train on"),
        ({"max_tokens": 10, "seq_len": 64, "heldout_windows": 100000}, [], "fewer than 100001 windows"),
    ],
)
def test_bad_inputs_one_line(
    tiny_model_dir, tiny_text_file, tmp_path, capsys, monkeypatch, entry, stages_before, expect
):
    from llmopt import models
    from llmopt.cli import main

    loads = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_text_file, *stages_before, distill_entry(**entry))))
    out = tmp_path / "out"
    rc = main(["compress", str(tiny_model_dir), "--recipe", str(path), "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and expect in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "out.ckpt").exists()
    if "windows" not in expect:  # the window count needs the tokenizer and the text, nothing else
        assert not loads


def test_quantized_input_folder_is_refused(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    """Distilling a folder that holds codes would silently drop its format: refused in one line."""
    from llmopt.cli import main

    q = tmp_path / "q"
    compress(str(tiny_model_dir), {"stages": [{"stage": "rtn", "format": "q4_0"}]}, q)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_text_file, distill_entry(teacher=str(tiny_model_dir)))))
    assert main(["compress", str(q), "--recipe", str(path), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is quantized (quantization.json)" in err and len(err.splitlines()) == 1


def test_resume_refuses_another_runs_checkpoint(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    from llmopt.distill import loop

    real = loop.batch_windows

    def failing(n_train, seed, step, *a):
        if step == 2:
            raise RuntimeError("injected failure")
        return real(n_train, seed, step, *a)

    stages = [
        {"stage": "magnitude", "sparsity": 0.5},
        distill_entry(max_tokens=64 * 4 * 4, checkpoint_every=1, checkpoint_minutes=None),
    ]
    monkeypatch.setattr(loop, "batch_windows", failing)
    with pytest.raises(RuntimeError, match="injected"):
        compress(str(tiny_model_dir), recipe(tiny_text_file, *stages), tmp_path / "o")
    monkeypatch.setattr(loop, "batch_windows", real)
    other = [stages[0], distill_entry(max_tokens=64 * 4 * 4, checkpoint_every=1, checkpoint_minutes=None, lr=5e-4)]
    with pytest.raises(LLMOptError, match="written by another run"):
        compress(str(tiny_model_dir), recipe(tiny_text_file, *other), tmp_path / "o", resume=True)
    compress(str(tiny_model_dir), recipe(tiny_text_file, *other), tmp_path / "o")  # without --resume: starts over
    assert not (tmp_path / "o.ckpt").exists()


def test_accelerate_state_is_reused_never_reset():
    """accelerate keeps one state per process: runs with the same settings share it; a run that needs
    other ones is refused in one line (no private reset of a state another Accelerator may use)."""
    from accelerate.state import is_initialized

    from llmopt.distill import loop

    a = loop._accelerator(cpu=True, mixed_precision="no")
    b = loop._accelerator(cpu=True, mixed_precision="no")
    assert is_initialized() and a.device.type == b.device.type == "cpu" and b.mixed_precision == "no"
    with pytest.raises(LLMOptError, match="needs a new process"):
        loop._accelerator(cpu=True, mixed_precision="bf16")
    assert loop._accelerator(cpu=True, mixed_precision="no").mixed_precision == "no"
