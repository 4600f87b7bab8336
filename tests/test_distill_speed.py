"""The faster distillation paths compute what the reference ones do (milliseconds to seconds each).

Properties: the fused head + top-k loss has the exact gradient (gradcheck in float64) and equals the
reference chunked loss and its gradients in float32, for every divergence and temperature, with a
trained head too; the objective module gives the same loss and gradients on the fused and the reference
path; bfloat16 mixed precision keeps float32 master weights and gradients and stays close to float32;
fake-quantized weights computed once per optimizer step give the very same gradients as recomputed per
micro-batch (with gradient checkpointing too), with the quantize/dequantize run once.
"""

from __future__ import annotations

import pytest
import torch

from llmopt.distill.config import DistillConfig
from llmopt.distill.objective import DistillLoss, fused_head_weight
from llmopt.distill.precision import resolve_precision
from llmopt.distill.teacher import Targets
from llmopt.kernels.distill import logit_distill_loss, teacher_buckets, topk_summary
from llmopt.kernels.distill_head import head_topk_loss
from tests.conftest import make_tiny_llama

KINDS = ("forward_kl", "reverse_kl", "jsd")


def _teacher(n: int, v: int, k: int, T: float, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    top, index, lse, tail = topk_summary(torch.randn(n, v, generator=g) * 3, k, T)
    return index, teacher_buckets(top, lse, tail, T).to(dtype), (top, lse, tail)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_fused_head_loss_gradient_is_exact_float64(kind, T):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(13, 5, generator=g, dtype=torch.float64, requires_grad=True)
    index, logp, _ = _teacher(7, 13, 3, T, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h, W: head_topk_loss(h, W, index, logp, kind, T, 0.3, chunk=3), (h, W))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_fused_head_loss_equals_the_reference_float32(kind, T):
    g = torch.Generator().manual_seed(2)
    h = (torch.randn(40, 16, generator=g) * 2).requires_grad_(True)
    W = (torch.randn(300, 16, generator=g) * 0.5).requires_grad_(True)
    index, logp, _ = _teacher(40, 300, 8, T, seed=3)
    ref = logit_distill_loss(h @ W.t(), logp, index, kind, T, 0.4)
    got = head_topk_loss(h, W, index, logp, kind, T, 0.4, chunk=16)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ref, (h, W)), torch.autograd.grad(got, (h, W))):
        assert float((a - b).norm() / a.norm()) < 1e-4  # float32 rounding of two orders of summation
    assert float(ref.detach()) > 0.1  # not a trivially matching pair


def test_fused_head_loss_bf16_matmuls_stay_close():
    """bfloat16 head matmuls (mixed precision): loss and gradient within bfloat16's rounding of float32."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(64, 32, generator=g).requires_grad_(True)
    W = torch.randn(500, 32, generator=g) * 0.3
    index, logp, _ = _teacher(64, 500, 16, 1.0, seed=5)
    ref = head_topk_loss(h, W, index, logp)
    got = head_topk_loss(h, W, index, logp, mm_dtype=torch.bfloat16)
    assert got.dtype == torch.float32 and abs(float(got.detach() / ref.detach()) - 1) < 1e-2
    (gr,), (gb,) = torch.autograd.grad(ref, h), torch.autograd.grad(got, h)
    assert gb.dtype == torch.float32 and float((gb - gr).norm() / gr.norm()) < 2e-2


def _student_and_targets(seed: int = 0, L: int = 24, k: int = 8):
    torch.manual_seed(seed)
    model = make_tiny_llama(96, seed=seed).float()
    for p in model.get_input_embeddings().parameters():
        p.requires_grad_(False)
    model.train()
    ids = torch.randint(0, 96, (2, L))
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(2 * L, 96, generator=g) * 2
    top, index, lse, tail = topk_summary(z, k, 1.0)
    return model, ids, Targets(index=index, top=top, lse=lse, tail=tail, lse1=lse, tail1=tail)


def _loss_and_grads(model, ids, tgt, **cfg_kw):
    precision = cfg_kw.pop("precision", "no")
    cfg = DistillConfig(stage="distill", chunk_tokens=10, **cfg_kw)
    loss, _ = DistillLoss(model, cfg, precision)(ids, tgt)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def test_objective_fused_and_reference_paths_agree():
    model, ids, tgt = _student_and_targets()
    assert fused_head_weight(model) is model.get_output_embeddings().weight  # the fused path is the one taken
    lf, gf = _loss_and_grads(model, ids, tgt, fused_loss=True)
    lr, gr = _loss_and_grads(model, ids, tgt, fused_loss=False)
    assert lf == pytest.approx(lr, rel=1e-5) and gf.keys() == gr.keys() and len(gf) > 10
    for n in gf:
        assert float((gf[n] - gr[n]).norm() / gr[n].norm()) < 1e-4, n


def test_bf16_keeps_float32_master_weights_and_grads():
    model, ids, tgt = _student_and_targets(seed=3)
    l32, g32 = _loss_and_grads(model, ids, tgt)
    l16, g16 = _loss_and_grads(model, ids, tgt, precision="bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(g.dtype == torch.float32 for g in g16.values()) and g16.keys() == g32.keys()
    assert l16 != l32 and l16 == pytest.approx(l32, rel=2e-2)  # bf16 ran, and rounds only a little
    for n in g32:
        assert float((g16[n] - g32[n]).norm() / g32[n].norm().clamp_min(1e-12)) < 0.1, n


def test_precision_auto_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto", cpu) == "no" and resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16" and resolve_precision("no", cpu) == "no"
    assert DistillConfig(stage="distill").mixed_precision == "auto"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fake_quant_once_per_step_gives_the_same_gradients(checkpointing):
    from llmopt.core.state import QuantizedLinear
    from llmopt.distill import fakequant
    from llmopt.formats.registry import make_format

    model, ids, tgt = _student_and_targets(seed=5)
    fmt, quantized = make_format("q4_0"), {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            qp = fmt.qparams(m.weight.detach())
            quantized[name] = QuantizedLinear(fmt.quantize(m.weight.detach(), qp), qp, fmt)
    fqs = fakequant.attach(model, quantized, {}, learn_scales=True)
    if checkpointing:  # a recomputed layer must see the same saved tensors as its first forward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    for fq in fqs.values():
        fq.register_forward_hook(lambda *a: calls.append(1))
    module = DistillLoss(model, DistillConfig(stage="distill", chunk_tokens=10))
    halves = [
        (ids[i : i + 1], Targets(**{k: v[24 * i : 24 * (i + 1)] for k, v in vars(tgt).items() if v is not None}))
        for i in range(2)
    ]

    def step(cached: bool):
        calls.clear()
        ctx = fakequant.once_per_step(model, fqs) if cached else torch.enable_grad()
        with ctx:
            for x, t in halves:
                loss, parts = module(x, t)
                loss.backward(retain_graph=cached)
                del loss, parts
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return grads, len(calls)

    g_each, n_each = step(False)
    g_once, n_once = step(True)
    assert n_each == (4 if checkpointing else 2) * len(fqs) and n_once == len(fqs)  # recomputed: twice
    assert g_each.keys() == g_once.keys() and any(".parametrizations.weight.0.scale" in n for n in g_once)
    for n in g_each:
        assert torch.equal(g_each[n], g_once[n]), n
