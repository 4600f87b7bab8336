"""``torchrun --nproc-per-node 2 -m llmopt.cli compress``: two processes on gloo, each calibrating on half the
windows, statistics all-reduced, each Linear's kernel on one owner and broadcast, give the output of the
one-process run (codes, scales, masks), and only process 0 writes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmopt import parallel
from tests.conftest import make_tiny_tokenizer
from tests.test_streaming import codes, random_llama, weights

CALIB = ["--calib-samples", "8", "--calib-seq-len", "64"]


@pytest.fixture(scope="module")
def tokenizer(tiny_text_file):
    return make_tiny_tokenizer(tiny_text_file.read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_compress(
    model, recipe: str, out: Path, calib: str, procs: int, calib_args=CALIB
) -> subprocess.CompletedProcess:
    """``llmopt compress`` in fresh processes: plain, or under torchrun with ``procs`` processes on gloo."""
    args = ["-m", "llmopt.cli", "compress", str(model), "--recipe", recipe, "--output", str(out)]
    args += ["--calib", calib, *calib_args]
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={procs}", "--master-addr=127.0.0.1"]
        cmd = [sys.executable, *launcher, f"--master-port={_free_port()}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(entries that differ, entries) over every tensor of two folders with the same tensors."""
    assert sorted(a) == sorted(b)
    diff = total = 0
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        diff += int((a[k] != b[k]).sum())
        total += a[k].numel()
    return diff, total


@pytest.mark.parametrize("recipe", ["gptq-q4_0", "sparsegpt-50"])
def test_two_processes_match_one(tokenizer, tiny_text_file, tmp_path, recipe):
    """The one-process output bit for bit: codes, scales, masks and weights (the statistics are float64 sums,
    exact in any order, and every window runs in the batch it runs in alone)."""
    model = random_llama(tmp_path / "model", tokenizer, hidden=64, layers=3, kv=2)
    calib = f"text:{tiny_text_file}"
    one, two = tmp_path / "one", tmp_path / "two"
    run_compress(model, recipe, one, calib, 1)
    p = run_compress(model, recipe, two, calib, 2)
    assert p.stdout.count(f"saved {two} ") == 1  # process 0 reports it, once
    assert not list(tmp_path.glob("two.*")) and not list(tmp_path.glob(".two*"))  # no second, half-written copy
    wa, wb = weights(one), weights(two)
    if recipe == "sparsegpt-50":
        assert sum(int((w == 0).sum()) for k, w in wa.items() if k.endswith("proj.weight")) > 0
        d, n = differing(wa, wb)  # the masks and the kept weights' OBS updates
    else:
        d, n = differing(codes(one), codes(two))
        assert n > 20_000
    assert d == 0, f"{d} of {n} values differ"
    ra = (one / "llmopt_report.json").read_text()
    rb = (two / "llmopt_report.json").read_text()
    assert '"calibration_tokens": 512' in ra and '"calibration_tokens": 512' in rb  # all 8 x 64 tokens, both


def test_two_processes_on_the_embedded_model(tmp_path, wikitext_path):
    """The embedded SmolLM2-135M, gptq-q4_0 with llama.cpp's mix, 2 batches of 4 x 128-token windows: two
    processes store the one-process codes and scales bit for bit."""
    import yaml

    rec = tmp_path / "recipe.yaml"
    rec.write_text(
        yaml.safe_dump(
            {
                "calibration": {"samples": 8, "seq_len": 128, "batch_size": 4},
                "stages": [{"stage": "gptq", "format": "q4_0", "act_order": True, "static_groups": True}],
            }
        )
    )
    one, two = tmp_path / "one", tmp_path / "two"
    text = f"text:{wikitext_path}#0:0.5"
    for out, procs in ((one, 1), (two, 2)):
        run_compress("bundled:smollm2", str(rec), out, text, procs, calib_args=[])
    d, n = differing(codes(one), codes(two))
    assert n > 100_000_000 and d == 0, f"{d} of {n} codes or scales differ"


def test_owners_balance_by_cost(monkeypatch):
    monkeypatch.setattr(parallel, "current", lambda: parallel.Ranks(0, 2))
    costs = {"q": 4.0, "k": 1.0, "v": 1.0, "o": 4.0, "gate": 10.0, "up": 10.0, "down": 10.0}
    own = parallel.owners(costs)
    load = [sum(c for n, c in costs.items() if own[n] == r) for r in (0, 1)]
    assert sorted(load) == [20.0, 20.0]  # 40 split evenly
    assert own == parallel.owners(dict(reversed(costs.items())))  # the same whatever the order given


def test_shard_deals_whole_batches(monkeypatch):
    from llmopt.errors import LLMOptError

    monkeypatch.setattr(parallel, "current", lambda: parallel.Ranks(1, 3))
    w = torch.arange(22).reshape(11, 2)  # batches of 2: [0,1] [2,3] [4,5] [6,7] [8,9] [10]
    assert torch.equal(parallel.shard(w, 2), torch.cat([w[2:4], w[8:10]]))  # batches 1 and 4
    with pytest.raises(LLMOptError, match="at least one batch per process"):
        parallel.shard(w[:4], 2)


def test_two_process_distillation_follows_one(tokenizer, tiny_text_file, tmp_path):
    """Magnitude 50% then distillation: 2 processes with 1 window per micro-batch each against 1 process with
    2 (the same global batch, the same windows in each step): the same training loss at every step within
    1e-4 (gloo sums the float32 gradients in another order), the masks the same, the output written once."""
    import json

    import yaml

    model = random_llama(tmp_path / "model", tokenizer, hidden=64, layers=2, kv=2)
    curves, computed, cached = {}, {}, {}
    for procs, batch in ((1, 2), (2, 1)):
        rec = {
            "calibration": {"data": f"text:{tiny_text_file}#0:0.5", "samples": 8, "seq_len": 64},
            "stages": [
                {"stage": "magnitude", "sparsity": 0.5},
                {"stage": "distill", "data": f"text:{tiny_text_file}", "seq_len": 64, "heldout_windows": 4,
                 "batch_size": batch, "grad_accum": 2, "max_tokens": 64 * 4 * 6, "max_minutes": None, "lr": 1e-3,
                 "warmup": 0.1, "eval_every": 3, "top_k": 32, "mixed_precision": "no"},
            ],
        }  # fmt: skip
        path = tmp_path / f"recipe-{procs}.yaml"
        path.write_text(yaml.safe_dump(rec))
        out = tmp_path / f"out-{procs}"
        os.environ["LLMOPT_CACHE"] = str(tmp_path / f"cache-{procs}")
        try:
            run_compress(model, str(path), out, f"text:{tiny_text_file}#0:0.5", procs)
        finally:
            del os.environ["LLMOPT_CACHE"]
        curves[procs] = json.loads((out / "distill_curve.json").read_text())
        d = json.loads((out / "llmopt_report.json").read_text())["model_stages"]["1:distill"]
        computed[procs], cached[procs] = d["teacher_windows_computed"], d["teacher_windows_cached"]
    # the teacher cache: process 0 of 2 computed only its half of the windows, and every window was cached
    assert cached[1] == cached[2] and computed[1] >= cached[1] > 0
    assert computed[2] <= (computed[1] + 1) // 2
    a, b = curves[1]["train"], curves[2]["train"]
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b] == [256 * s for s in range(1, 7)]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-4, (ra, rb)
    ha, hb = curves[1]["heldout"], curves[2]["heldout"]
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == [0, 3, 6]
    assert abs(ha[-1]["loss"] - hb[-1]["loss"]) < 1e-4
    wa, wb = weights(tmp_path / "out-1"), weights(tmp_path / "out-2")
    for k in wa:
        if k.endswith("proj.weight"):
            assert torch.equal(wa[k] == 0, wb[k] == 0), k
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out-2")) == ["out-2"]


def test_device_auto_without_cuda_is_the_cpu(monkeypatch):
    """``--device auto``: CUDA where there is one (the process's own under torchrun), else the CPU."""
    from llmopt.models import _parse_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _parse_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert _parse_device("auto") == torch.device("cuda", 1)
