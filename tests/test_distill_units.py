"""Pieces of the distill stage tested alone on toy tensors (milliseconds each), and its checks on the
tiny model (seconds): the gradual pruner's sparsity follows the cubic schedule exactly, whatever the rows'
starting sparsities; SquareHead is checked against the student the structured stages leave."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmopt.compression import compress
from llmopt.distill.config import GradualConfig
from llmopt.distill.schedules import cubic_sparsity
from llmopt.distill.sparsity import GradualPruner
from llmopt.errors import LLMOptError
from llmopt.kernels.pruning import n_pruned
from llmopt.kernels.wanda import wanda_prune


def uneven_mask(out: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Keep-mask whose rows start at very different sparsities (0% to 90%), 50% overall on average."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(out, cols, dtype=torch.bool)
    for i in range(out):
        k = round(0.9 * cols * i / (out - 1))
        mask[i, torch.randperm(cols, generator=g)[:k]] = False
    return mask


@pytest.mark.parametrize("score", ["wanda", "magnitude"])
def test_gradual_pruner_follows_the_cubic_schedule_from_uneven_rows(score):
    """Each update ends at exactly round(s_j · numel) pruned (s_j the cubic schedule's value), pruned
    weights stay pruned. Wanda compares within rows: rows already above s_j must not push the layer past it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 16, bias=False))
    mask = uneven_mask(16, 48)
    masks = {"0": mask.clone()}
    cfg = GradualConfig(target=0.8, start=0.0, end=1.0, updates=4, score=score)
    pruner = GradualPruner(cfg, model, ["0"], masks)
    s_i = pruner.initial["0"]
    prev = mask
    for j in range(1, cfg.updates + 1):
        model(torch.randn(5, 48))  # Σx² for the Wanda scores
        assert pruner.step(j / cfg.updates)
        want = n_pruned(cubic_sparsity(s_i, cfg.target, j, cfg.updates), mask.numel())
        assert int((~masks["0"]).sum()) == want, j
        assert not bool((masks["0"] & ~prev).any())  # never regrows
        prev = masks["0"]
    assert pruner.sparsity() == pytest.approx(n_pruned(0.8, mask.numel()) / mask.numel())
    pruner.remove()


def test_wanda_prior_mask_tops_rows_up_evenly():
    """With ``prior``, the already pruned weights count toward the target: the layer ends with exactly
    round(s · numel) pruned, rows below the common level are raised to it (±1), rows above keep theirs."""
    torch.manual_seed(1)
    W, act = torch.randn(16, 48), torch.rand(48)
    prior = uneven_mask(16, 48)
    res = wanda_prune(W * prior, act, 0.6, prior=prior)
    assert int((~res.mask).sum()) == n_pruned(0.6, W.numel())
    assert not bool((res.mask & ~prior).any())
    before, after = (~prior).sum(1), (~res.mask).sum(1)  # (out,) per-row pruned counts
    raised = after > before
    assert raised.any() and (after[~raised] == before[~raised]).all()
    level = int(after[raised].min())
    assert int(after[raised].max()) <= level + 1 and bool((before[~raised] >= level).all())


def test_topup_quotas_water_fills():
    """Rows below the level are raised to it, rows above keep theirs, the leftover spread one per row."""
    from llmopt.kernels.pruning import topup_quotas

    already = torch.tensor([0, 9, 2, 5, 0])
    assert topup_quotas(already, 20).tolist() == [2, 9, 2, 5, 2]
    assert topup_quotas(already, 22).tolist() == [3, 9, 2, 5, 3]
    assert topup_quotas(already, 27).tolist() == [4, 9, 5, 5, 4]  # level 4; the one left over: a row at it
    assert topup_quotas(already, 10).tolist() == already.tolist()  # below what is pruned: nothing revived
    assert topup_quotas(torch.zeros(4, dtype=torch.long), 10).tolist() == [2, 3, 3, 2]


def test_bench_distill_records_the_final_sparsity(monkeypatch):
    """A gradual row ends at the distill stage's sparsity, not at the one-shot stage's it started from."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "eval"))
    import bench_distill

    gradual = {
        "stages": {"0:sparsegpt": {"sparsity": 0.5}, "1:distill": {"tokens": 10}},
        "model_stages": {"1:distill": {"gradual_sparsity": 0.7}},
    }
    assert bench_distill.final_sparsity(gradual) == 0.7
    two = {"stages": {"0:sparsegpt": {"sparsity": 0.5}, "1:magnitude": {"sparsity": 0.6}}, "model_stages": {}}
    assert bench_distill.final_sparsity(two) == 0.6
    assert bench_distill.final_sparsity({"stages": {"0:gptq": {}}, "model_stages": {}}) is None


@pytest.fixture
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "llmopt-cache"))


def structured_distill(tiny_text_file, cut: dict, **distill) -> dict:
    entry = {"stage": "distill", "max_tokens": 128, "seq_len": 32, "top_k": 8, "heldout_windows": 1}
    return {
        "calibration": {"data": f"text:{tiny_text_file}#0:0.5", "samples": 4, "seq_len": 32},
        "stages": [{"stage": "structured", **cut}, {**entry, "max_minutes": None, "eval_every": 2, **distill}],
    }


@pytest.mark.parametrize("cut", [{"hidden_size": 32}, {"num_layers": 1}])
def test_squarehead_checks_the_cut_student_before_any_stage(cut, tiny_model_dir, tiny_text_file, tmp_path, _cache):
    """A structured cut of the width or depth before a SquareHead distill: one-line LLMOptError before the
    cut runs (it used to pass the check on the uncut model and fail in training on the shapes)."""
    import llmopt.structured as structured

    calls = []
    real = structured.prune
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(structured, "prune", lambda *a, **k: calls.append(1) or real(*a, **k))
        with pytest.raises(LLMOptError, match="hidden_weight") as e:
            compress(str(tiny_model_dir), structured_distill(tiny_text_file, cut, hidden_weight=0.5), tmp_path / "o")
    assert "\n" not in str(e.value) and "set hidden_weight: 0" in str(e.value) and not calls


def test_squarehead_after_a_cut_that_keeps_width_and_depth(tiny_model_dir, tiny_text_file, tmp_path, _cache):
    res = compress(
        str(tiny_model_dir),
        structured_distill(tiny_text_file, {"intermediate_size": 64}, hidden_weight=0.5),
        tmp_path / "o",
    )
    assert res.report["model_stages"]["1:distill"]["steps"] > 0


@pytest.mark.parametrize("spec", [dict(name="int", bits=4, group_size=32), dict(name="q4_0"), dict(name="q4_1")])
def test_learned_scales_train_on_the_fp16_grid_the_export_writes(spec):
    """With learn_scales the forward rounds the scales (and q4_1's minima) to the fp16 the folder stores,
    straight-through: the weights trained on are bit for bit the weights :func:`finish` exports."""
    from llmopt.core.state import QuantizedLinear
    from llmopt.distill import fakequant
    from llmopt.formats import make_format, rtn_quantize

    torch.manual_seed(0)
    fmt = make_format(**spec)
    model = nn.Sequential(nn.Linear(64, 8, bias=False))
    q = rtn_quantize(model[0].weight.detach(), fmt)
    quantized = {"0": QuantizedLinear(q.codes, q.qparams, fmt)}
    fqs = fakequant.attach(model, quantized, {}, learn_scales=True)
    fq = fqs["0"]
    with torch.no_grad():  # as after some AdamW steps: values between fp16 numbers
        fq.scale.mul_(1 + 3e-4 * torch.rand_like(fq.scale))
        if fq.zero is not None:
            fq.zero.add_(1e-5 * torch.rand_like(fq.zero))
    trained = model[0].weight.detach().clone()
    model[0].weight.sum().backward()
    assert float(fq.scale.grad.abs().sum()) > 0  # the rounding passes the gradient straight through
    fakequant.finish(model, fqs, quantized)
    assert torch.equal(model[0].weight.detach(), trained)
    assert torch.equal(quantized["0"].qparams.scale, quantized["0"].qparams.scale.half().float())


def test_scales_get_their_own_learning_rate():
    """learn_scales: the scales and minima train at ``scale_lr`` (default lr · SCALE_LR_RATIO), in their own
    AdamW group without weight decay; the schedule multiplies every group's own base rate."""
    from llmopt.core.state import QuantizedLinear
    from llmopt.distill import fakequant, loop
    from llmopt.distill.config import SCALE_LR_RATIO, DistillConfig
    from llmopt.formats import make_format, rtn_quantize

    model = nn.Sequential(nn.Linear(64, 8), nn.LayerNorm(8))
    q = rtn_quantize(model[0].weight.detach(), make_format("q4_1"))
    fqs = fakequant.attach(model, {"0": QuantizedLinear(q.codes, q.qparams, make_format("q4_1"))}, {}, True)
    for cfg, want in [
        (DistillConfig(stage="distill", lr=2e-4, weight_decay=0.1, learn_scales=True), 2e-4 * SCALE_LR_RATIO),
        (DistillConfig(stage="distill", lr=2e-4, learn_scales=True, scale_lr=3e-6), 3e-6),
    ]:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        opt = loop._optimizer(params, cfg)
        by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
        for p in (fqs["0"].scale, fqs["0"].zero):
            assert by_param[id(p)]["lr"] == pytest.approx(want) and by_param[id(p)]["weight_decay"] == 0.0
        assert by_param[id(fakequant.latent(model, "0"))]["lr"] == pytest.approx(2e-4)
        loop.set_lr(opt, 0.5)
        assert by_param[id(fqs["0"].scale)]["lr"] == pytest.approx(want / 2)
        assert by_param[id(model[1].weight)]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("top_k", [8, None])
def test_heldout_kl_says_what_it_is(top_k, tiny_model_dir, tiny_text_file, tmp_path, _cache, capsys, caplog):
    """With cached top-k teacher logits the held-out number is the KL between k + 1 buckets, a lower bound
    of the KL: its JSON key, the report, the CLI line, the log and the plot say so; full logits: the KL."""
    import json
    import logging

    import yaml

    from llmopt.cli import main
    from llmopt.distill.curve import figure

    entry = {"stage": "distill", "max_tokens": 128, "seq_len": 32, "top_k": top_k, "heldout_windows": 1}
    rec = {
        "calibration": {"data": f"text:{tiny_text_file}#0:0.5", "samples": 4, "seq_len": 32},
        "stages": [{"stage": "magnitude", "sparsity": 0.5}, {**entry, "max_minutes": None, "eval_every": 2}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    out = tmp_path / "o"
    with caplog.at_level(logging.INFO, logger="llmopt.distill.loop"):
        assert main(["compress", str(tiny_model_dir), "--recipe", str(tmp_path / "r.yaml"), "--output", str(out)]) == 0
    key, words = ("kl", "held-out KL (T=1, full vocabulary)") if top_k is None else ("kl_topk_bound", "bound")
    d = json.loads((out / "llmopt_report.json").read_text())["model_stages"]["1:distill"]
    curve = json.loads((out / "distill_curve.json").read_text())
    for r in [d["heldout_before"], d["heldout_after"], *curve["heldout"]]:
        assert key in r and ({"kl", "kl_topk_bound"} - {key}).isdisjoint(r), r
    assert words in d["heldout_kl"] and words in curve["heldout_kl"]
    assert words in capsys.readouterr().out
    assert any(words in m for m in caplog.messages)
    legend = [t.get_text() for t in figure(curve, "t").axes[0].get_legend().get_texts()]
    assert any(words in t for t in legend)
