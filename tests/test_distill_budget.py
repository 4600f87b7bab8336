"""The work a distill stage plans and what it costs: the teacher cache sized by the time budget (and
extended, to the same result, when training outruns it), the duration estimate's arithmetic on synthetic
recipes, the per-phase peak RSS in the stage report. Tiny random Llama, seconds each; no clock thresholds.
"""

from __future__ import annotations

import math

import pytest
import torch

from llmopt.compression import compress
from llmopt.distill import budget
from llmopt.distill.config import DistillConfig
from llmopt.recipe import parse_recipe

SEQ = 64


def entry(**kw) -> dict:
    base = dict(
        stage="distill", seq_len=SEQ, heldout_windows=4, batch_size=2, grad_accum=2, max_tokens=SEQ * 4 * 4,
        max_minutes=1000.0, lr=1e-3, warmup=0.1, eval_every=2, top_k=16, checkpoint_minutes=None,
    )  # fmt: skip
    return {**base, **kw}


def recipe(text, *stages) -> dict:
    return {"calibration": {"data": f"text:{text}#0:0.5", "samples": 8, "seq_len": SEQ}, "stages": list(stages)}


# --- budget arithmetic --------------------------------------------------------------------------------


def test_cache_windows_follow_the_time_budget_not_max_tokens():
    n = 135_000_000
    cfg = DistillConfig(
        stage="distill", max_tokens=1_000_000, max_minutes=30, gradient_checkpointing=False, mixed_precision="no"
    )
    rate = budget.TRAIN_PARAM_TOKENS_PER_S / n
    assert budget.train_tokens_per_second(cfg, n) == pytest.approx(rate)
    assert budget.planned_tokens(cfg, n) == int(rate * 1800)
    assert budget.cache_windows(cfg, n) == math.ceil(budget.CACHE_MARGIN * int(rate * 1800) / 512)
    assert budget.cache_windows(cfg, n) < 1_000_000 / 512  # not what max_tokens would reach
    # twice the budget, twice the windows (±1 for rounding); a student half the size trains twice as fast
    double = cfg.model_copy(update={"max_minutes": 60})
    assert abs(budget.cache_windows(double, n) - 2 * budget.cache_windows(cfg, n)) <= 1
    assert abs(budget.cache_windows(cfg, n // 2) - 2 * budget.cache_windows(cfg, n)) <= 1
    # max_tokens stays the bound; no clock: max_tokens alone
    small = cfg.model_copy(update={"max_tokens": 4096})
    assert budget.cache_windows(small, n) == 8 and budget.train_seconds(small, n) == pytest.approx(4096 / rate)
    assert budget.cache_windows(cfg.model_copy(update={"max_minutes": None}), n) == math.ceil(1_000_000 / 512)
    assert budget.train_seconds(cfg, n) == 1800.0
    # slower with gradient checkpointing or a live teacher
    ckpt = cfg.model_copy(update={"gradient_checkpointing": True})
    assert budget.train_tokens_per_second(ckpt, n) == pytest.approx(rate / budget.CHECKPOINTING_SLOWDOWN)
    # faster in bfloat16 with the fused loss (the defaults where bfloat16 is native)
    bf16 = cfg.model_copy(update={"mixed_precision": "bf16"})
    assert budget.train_tokens_per_second(bf16, n) == pytest.approx(rate * budget.MIXED_PRECISION_SPEEDUP)
    unfused = bf16.model_copy(update={"fused_loss": False})
    assert budget.train_tokens_per_second(unfused, n) == pytest.approx(rate)


def test_student_params_after_a_structured_stage():
    rec = parse_recipe(
        {
            "calibration": {"data": "wikitext2"},
            "stages": [
                {"stage": "structured", "params": 0.6},
                {"stage": "distill"},
                {"stage": "gptq", "format": "q4_0"},
            ],
        }
    )
    assert budget.student_params(rec.stages, 1, 1000) == 600
    assert budget.student_params(rec.stages, 0, 1000) == 1000


def test_estimate_is_the_recipes_work(tmp_path):
    """One-shot stage + teacher windows (the budget's, capped by the text) at the teacher's rate + the
    training budget, start-up, nothing else without export or evaluation."""
    from llmopt.pipeline import PipelineOptions, estimate
    from llmopt.pipeline.estimate import BYTES_PER_TOKEN, DISTILL_OVERHEAD_S, REFERENCE_PARAMS

    text = tmp_path / "t.txt"
    text.write_bytes(b"x" * int(BYTES_PER_TOKEN * 512 * 1000 + 100))  # ~1000 windows of 512 tokens, 500 in #0:0.5
    n = 270_000_000  # twice the reference: everything at half speed
    distill = {"stage": "distill", "max_tokens": 1_000_000, "max_minutes": 10, "gradient_checkpointing": False}
    rec = parse_recipe(
        {"calibration": {"data": f"text:{text}#0:0.5"}, "stages": [{"stage": "gptq", "format": "q4_0"}, distill]}
    )
    opts = PipelineOptions().with_recipe(rec)
    est = estimate(n, rec, opts)
    cfg = rec.stages[1]
    windows = budget.cache_windows(cfg, n)
    assert windows < 496  # the budget, not the text, bounds the cache here
    assert est.parts["teacher cache"] == pytest.approx((windows + 4) * 512 / budget.teacher_tokens_per_second(n))
    assert est.parts["training"] == pytest.approx(600 + DISTILL_OVERHEAD_S * n / REFERENCE_PARAMS)
    assert est.parts["stages"] == pytest.approx(110 * n / REFERENCE_PARAMS)
    assert set(est.parts) == {"start", "stages", "teacher cache", "training"}
    assert est.seconds == pytest.approx(sum(est.parts.values()))

    # a longer budget: the text (496 training windows) bounds the cache; training is still the budget
    long = parse_recipe(
        {
            "calibration": {"data": f"text:{text}#0:0.5"},
            "stages": [{"stage": "gptq", "format": "q4_0"}, {**distill, "max_minutes": 120}],
        }
    )
    e2 = estimate(n, long, opts)
    assert e2.parts["teacher cache"] == pytest.approx(500 * 512 / budget.teacher_tokens_per_second(n))
    assert e2.parts["training"] == pytest.approx(7200 + DISTILL_OVERHEAD_S * n / REFERENCE_PARAMS)

    # tokens before the clock: max_tokens at the student's rate, a student made smaller by structured pruning
    short = {**distill, "max_tokens": 8192}
    rec3 = parse_recipe(
        {"calibration": {"data": f"text:{text}#0:0.5"}, "stages": [{"stage": "structured", "params": 0.5}, short]}
    )
    e3 = estimate(n, rec3, opts)
    student = n // 2
    rate = budget.train_tokens_per_second(rec3.stages[1], student)
    assert e3.parts["training"] == pytest.approx(8192 / rate + DISTILL_OVERHEAD_S * student / REFERENCE_PARAMS)
    assert e3.parts["teacher cache"] == pytest.approx((16 + 4) * 512 / budget.teacher_tokens_per_second(n))


def test_structured_stage_is_priced_by_its_parts():
    """Importance pass + greedy depth ranking ((removed) x (left) partial forwards on SmolLM2's 30 layers,
    22 kept at params 0.6 over MLP + depth) + reconstruction; each part goes with its option."""
    from llmopt.pipeline.estimate import GREEDY_HEAD_S, GREEDY_LAYER_S, structured_seconds

    def st(**kw):
        return parse_recipe({"stages": [{"stage": "structured", "params": 0.6, **kw}]}).stages[0]

    greedy = sum(GREEDY_LAYER_S * k * (k + 1) / 2 + GREEDY_HEAD_S * k for k in range(23, 31))
    assert structured_seconds(st(), 2.0, 1.0) == pytest.approx(2 * (30 + greedy + 75))
    assert structured_seconds(st(reconstruct=False), 1.0, 2.0) == pytest.approx(60 + greedy)
    assert structured_seconds(st(depth_ranking="block_influence"), 1.0, 1.0) == pytest.approx(105)
    assert structured_seconds(st(axes=["mlp"]), 1.0, 1.0) == pytest.approx(105)  # no layer goes: no ranking


# --- the cache on a tiny model --------------------------------------------------------------------------


def _fill_spy(monkeypatch) -> list[int]:
    from llmopt.distill import teacher as teacher_mod

    calls: list[int] = []
    real = teacher_mod.TopKCache.fill

    def spy(self, model, windows, chunk_tokens=512):
        calls.append(len(self.missing(windows)))
        return real(self, model, windows, chunk_tokens)

    monkeypatch.setattr(teacher_mod.TopKCache, "fill", spy)
    return calls


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_cache_sized_by_budget_and_extended_to_the_same_result(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    """Planned: 128 tokens (2 windows, 3 with the margin) of a 16-window token budget. Training outruns
    the cache; the teacher is loaded again from the model spec and the cache extended (3 → 6 → 12 → 16):
    the run ends exactly where a run with every window cached up front ends."""
    stages = [{"stage": "magnitude", "sparsity": 0.5}, entry()]
    rec = recipe(tiny_text_file, *stages)

    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "cache-planned"))
    monkeypatch.setattr(budget, "train_tokens_per_second", lambda cfg, n: 2 * SEQ / (60 * cfg.max_minutes))
    calls = _fill_spy(monkeypatch)
    res = compress(str(tiny_model_dir), rec, tmp_path / "planned")
    d = res.report["model_stages"]["1:distill"]
    assert calls == [3 + 4, 3, 6, 4]  # 3 training + 4 held-out windows first, then the extensions
    assert d["teacher_windows_computed"] == 7 and d["teacher_windows_extended"] == 13
    assert d["teacher_windows_cached"] == 16 and d["steps"] == 4 and d["stopped_by"] == "tokens"
    assert "teacher_extend" in d["peak_rss_mib_by_phase"]

    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "cache-all"))
    monkeypatch.setattr(budget, "train_tokens_per_second", lambda cfg, n: 1e9)
    calls.clear()
    res_all = compress(str(tiny_model_dir), rec, tmp_path / "all")
    assert calls == [16 + 4] and res_all.report["model_stages"]["1:distill"]["teacher_windows_extended"] == 0
    a, b = _weights(tmp_path / "planned"), _weights(tmp_path / "all")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
    assert d["heldout_after"]["kl_topk_bound"] == pytest.approx(
        res_all.report["model_stages"]["1:distill"]["heldout_after"]["kl_topk_bound"]
    )


def test_without_a_teacher_to_reload_training_reuses_cached_windows(tiny_model_dir, tiny_text_file, tmp_path):
    """Teacher.ensure with no live model and a loader that gives none: indices wrap onto the cached
    prefix (the run continues on windows it has seen) and nothing is computed."""
    from llmopt.distill.teacher import Teacher, TopKCache

    cache = TopKCache(tmp_path, "f" * 16, 4, 1.0)
    pool = torch.arange(10 * SEQ).view(10, SEQ)
    t = Teacher(cache, None, False, pool=pool, ready=3, loader=lambda: None)
    assert t.ensure([0, 2]) == [0, 2]
    assert t.ensure([4, 5]) == [1, 2] and t.extended == 0 and t.ready == 3


def test_phase_peaks_in_the_stage_report(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "cache"))
    res = compress(str(tiny_model_dir), recipe(tiny_text_file, entry(max_tokens=SEQ * 4 * 2)), tmp_path / "o")
    r = res.report
    peaks = r["model_stages"]["0:distill"]["peak_rss_mib_by_phase"]
    assert {"load", "teacher_cache", "train", "finish"} <= set(peaks)
    assert "teacher_extend" not in peaks  # every window the budget trains was cached up front
    assert all(0 < v <= r["peak_rss_mib"] + 1 for v in peaks.values())
    whole = r["peak_rss_mib_by_phase"]  # the run's own phases: the same numbers, plus the save
    assert whole["distill.train"] == peaks["train"] and "save" in whole
    assert max(whole.values()) <= r["peak_rss_mib"] + 1
