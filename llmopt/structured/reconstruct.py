"""Reconstruction at the cut: after :func:`llmopt.structured.prune`, every Linear of the cut model is
refitted by least squares (:mod:`llmopt.kernels.reconstruct`) to give the *uncut* model's outputs on the
calibration windows, layer after layer, the cut model fed its own activations (sequential, as in the
calibration engine), so each refit also absorbs what the cuts before it changed:

* q/k/v (kept heads' rows) on the cut model's normed residual: the uncut q/k/v outputs. This takes
  the hidden-channel cut (missing input columns) and the RMSNorm now averaging over fewer channels;
* o_proj (kept heads' columns, kept hidden rows): the uncut attention output plus the residual error
  the cut model carries into the layer (uncut residual − cut residual, kept channels), so the
  residual stream after attention matches the uncut one in the least-squares sense;
* gate/up (kept MLP rows): the uncut gate/up outputs; down_proj (kept MLP columns): the uncut MLP
  output plus the carried residual error plus, with ``fold``, the residual contribution of the removed
  decoder layers that follow it (the cut model's layer j is matched to the uncut residual just before
  the next kept layer);
* the output head: refitted the same way when untied; a tied embedding stays, and the final norm's
  weight is fitted instead (:func:`~llmopt.kernels.reconstruct.fit_gain`) on the uncut logits.

With ``refine_epochs``, each layer is then refined as a whole by gradient descent toward the same target
(:mod:`llmopt.structured.refine`) before its outputs feed the next one.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from llmopt.calibration.capture import StopForward, capture_layer_inputs, hidden_of
from llmopt.kernels.reconstruct import fit_gain, refit
from llmopt.kernels.structured import head_channels, heads_to_groups
from llmopt.memory import release_freed_memory
from llmopt.precision import native_bf16
from llmopt.structured.config import StructuredConfig
from llmopt.structured.layout import sizes_of
from llmopt.structured.plan import Cut
from llmopt.structured.refine import refine_layer


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).float()


class _Capture:
    """Pre-hooks storing the inputs of named submodules on one forward; stops it after ``stop``."""

    def __init__(self, layer: nn.Module, names: dict[str, str], stop: str | None = None):
        self.got: dict[str, torch.Tensor] = {}
        mods = dict(layer.named_modules())
        self.handles = [
            mods[path].register_forward_pre_hook(self._hook(key, key == stop)) for key, path in names.items()
        ]

    def _hook(self, key: str, stop: bool):
        def fn(_m, args):
            self.got[key] = _flat(args[0])
            if stop:
                raise StopForward

        return fn

    def run(self, layer: nn.Module, hidden: torch.Tensor, layer_args) -> torch.Tensor | None:
        self.got = {}
        args, kwargs = layer_args
        try:
            return hidden_of(layer(hidden, *args, **kwargs))
        except StopForward:
            return None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


PATHS = {
    "qkv": "self_attn.q_proj",
    "o": "self_attn.o_proj",
    "mid": "post_attention_layernorm",  # its input: the residual stream after attention
    "gate": "mlp.gate_proj",
    "down": "mlp.down_proj",
}


class _Sums:
    def __init__(self):
        self.H = self.C = self.E = None

    def add(self, xs: torch.Tensor, xt: torch.Tensor, e: torch.Tensor | None = None) -> None:
        parts = {"H": xs.t() @ xs, "C": xs.t() @ xt}
        if e is not None:
            parts["E"] = xs.t() @ e
        for k, v in parts.items():
            acc = getattr(self, k)
            setattr(self, k, v.double() if acc is None else acc.add_(v.double()))


def _set_weight(lin: nn.Linear, W: torch.Tensor) -> None:
    lin.weight.data.copy_(W.to(lin.weight.dtype))


@torch.no_grad()
def reconstruct(
    teacher: nn.Module,
    student: nn.Module,
    cut: Cut,
    windows: torch.Tensor,
    batch_size: int = 4,
    damp: float = StructuredConfig.model_fields["damp"].default,
    fold: bool = True,
    progress: bool = True,
    refine_epochs: int = 0,
    refine_lr: float = StructuredConfig.model_fields["refine_lr"].default,
) -> dict:
    """Refit ``student`` (``teacher`` cut by ``cut``) in place on ``windows`` (N, L); returns a small report.
    ``refine_epochs`` > 0: each refitted layer is then refined as a whole
    (:func:`~llmopt.structured.refine.refine_layer`)."""
    run = _Run(teacher, student, cut, windows, batch_size, damp, fold, (refine_epochs, refine_lr))
    bar = tqdm(range(len(student.model.layers)), desc="reconstruct", unit="layer", disable=not progress)
    for j in bar:
        run.layer(j)
        if run.refined:
            bar.set_postfix(error=f"{run.refined[-1][0]:.3g}->{run.refined[-1][1]:.3g}")
    report = {"damp": damp, "fold": fold, "tokens": int(windows.numel())}
    if refine_epochs:
        report["refine"] = {
            "epochs": refine_epochs,
            "lr": refine_lr,
            "bf16": run.bf16,
            "layer_error_before_after": [[round(a, 5), round(b, 5)] for a, b in run.refined],
        }
    return report | _head(teacher, student, run.t_h, run.s_h, damp)


class _Run:
    """The state of one reconstruction: both models' hidden states per batch, advanced layer by layer."""

    def __init__(self, teacher, student, cut: Cut, windows, batch_size: int, damp: float, fold: bool, refine):
        self.s, self.cut, self.damp, self.fold = sizes_of(teacher), cut, damp, fold
        self.tl, self.sl = teacher.model.layers, student.model.layers
        self.kept = cut.layers if cut.layers is not None else list(range(len(self.tl)))
        self.hk = cut.hidden
        self.batches = capture_layer_inputs(teacher, self.tl, windows, batch_size)
        self.t_h = [b.hidden.clone() for b in self.batches]
        self.s_h = [self.kept_h(h, -1, copy=True) for h in self.t_h]
        # Qwen3's per-head q/k norms: the cut scaled q/k rows by √(H/H') (llmopt.structured.surgery); so do the targets
        qk = self.hk is not None and hasattr(self.sl[0].self_attn, "q_norm")
        self.qk_scale = math.sqrt(self.s.hidden / self.hk.numel()) if qk else 1.0
        self.refine: tuple[int, float] = refine  # (epochs, lr)
        self.refined: list[tuple[float, float]] = []
        self.bf16 = native_bf16(self.batches[0].hidden.device) if self.batches else False

    def kept_h(self, x: torch.Tensor, dim: int, copy: bool = False) -> torch.Tensor:
        """The kept residual-stream channels of ``x`` along ``dim`` (the rows of a Linear writing the residual).
        Without a hidden cut that is ``x`` itself (to be read only), or a copy of it with ``copy``."""
        if self.hk is None:
            return x.clone() if copy else x
        return x.index_select(dim, self.hk.to(x.device))

    def _forward(self, layer: nn.Module, h: list, i: int) -> None:
        for k, b in enumerate(self.batches):
            h[k] = hidden_of(layer(h[k], *b.layer_args[i][0], **b.layer_args[i][1]))

    def _teacher(self, i: int, nxt: int) -> tuple[list, list]:
        """The uncut layer i's inputs (``t_in``) and, per batch, its residual after attention, o_proj's and
        down_proj's inputs and its output; then its removed layers up to ``nxt``. q/k/v's and gate/up's inputs
        are not kept: they are the layer's norms of ``t_in`` and of the residual after attention, recomputed
        batch by batch where they are needed (two fewer hidden-wide activations held over all tokens)."""
        cap = _Capture(self.tl[i], {key: PATHS[key] for key in ("o", "mid", "down")})
        t_in, t_act = [], []
        for k, b in enumerate(self.batches):
            y = cap.run(self.tl[i], self.t_h[k], b.layer_args[i])
            t_in.append(_flat(self.t_h[k]))
            t_act.append(dict(cap.got, out=_flat(y)))
            self.t_h[k] = y
        cap.remove()
        for r in range(i + 1, nxt):
            self._forward(self.tl[r], self.t_h, r)
        return t_in, t_act

    def _sums(self, S: nn.Module, i: int, key: str, uncut, correction=None) -> _Sums:
        """H, C (and E) of the cut layer's Linear input ``key`` against the uncut one's (``uncut(k)`` for
        batch k), over all batches."""
        acc = _Sums()
        c = _Capture(S, {key: PATHS[key], **({"mid": PATHS["mid"]} if key == "down" else {})}, stop=key)
        for k, b in enumerate(self.batches):
            c.run(S, self.s_h[k], b.layer_args[i])
            acc.add(c.got[key], uncut(k), None if correction is None else correction(k, c.got))
        c.remove()
        return acc

    def layer(self, j: int) -> None:
        i = self.kept[j]
        nxt = self.kept[j + 1] if j + 1 < len(self.kept) else len(self.tl)
        T, S, s, damp = self.tl[i], self.sl[j], self.s, self.damp
        t_in, t_act = self._teacher(i, nxt)
        q_rows = kv_rows = None
        if self.cut.groups is not None:
            g = self.cut.groups[i]
            q_rows = head_channels(heads_to_groups(g, s.heads_per_group), s.head_dim)
            kv_rows = head_channels(g, s.head_dim)
        acc = self._sums(S, i, "qkv", lambda k: _flat(T.input_layernorm(t_in[k])))
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            W = getattr(T.self_attn, name).weight
            W = (W if rows is None else W[rows]) * (self.qk_scale if name != "v_proj" else 1.0)
            _set_weight(getattr(S.self_attn, name), refit(W, acc.H, acc.C, damp=damp))
        # o_proj: the uncut attention output + the residual error carried into the layer (kept channels)
        acc = self._sums(
            S, i, "o", lambda k: t_act[k]["o"], lambda k, got: self.kept_h(t_in[k], 1) - _flat(self.s_h[k])
        )
        _set_weight(S.self_attn.o_proj, refit(self.kept_h(T.self_attn.o_proj.weight, 0), acc.H, acc.C, acc.E, damp))
        acc = self._sums(S, i, "gate", lambda k: _flat(T.post_attention_layernorm(t_act[k]["mid"])))
        mk = self.cut.mlp[i] if self.cut.mlp is not None else None
        for name in ("gate_proj", "up_proj"):
            W = getattr(T.mlp, name).weight
            _set_weight(getattr(S.mlp, name), refit(W if mk is None else W[mk], acc.H, acc.C, damp=damp))

        def down_target(k: int, got: dict) -> torch.Tensor:
            e = self.kept_h(t_act[k]["mid"], 1) - got["mid"]  # the residual error after attention
            if self.fold and nxt > i + 1:  # the removed layers' contribution to the residual
                e += self.kept_h(_flat(self.t_h[k]) - t_act[k]["out"], 1)
            return e

        acc = self._sums(S, i, "down", lambda k: t_act[k]["down"], down_target)
        _set_weight(S.mlp.down_proj, refit(self.kept_h(T.mlp.down_proj.weight, 0), acc.H, acc.C, acc.E, damp))
        # the uncut layer's Linear inputs (~1.2 GiB over 128 x 512 tokens at SmolLM2's widths) are done with:
        # freed before the refinement, whose own activations and Adam state would otherwise come on top of them
        t_act.clear()
        t_in.clear()
        release_freed_memory()
        epochs, lr = self.refine
        if epochs:  # self.s_h is still this layer's input; self.t_h the uncut residual entering the next kept one
            targets = [self.kept_h(t, -1) for t in self.t_h]  # read only
            args = [b.layer_args[i] for b in self.batches]
            self.refined.append(refine_layer(S, self.s_h, targets, args, epochs, lr, self.bf16, seed=j))
        self._forward(S, self.s_h, i)


def _head(teacher: nn.Module, student: nn.Module, t_h: list, s_h: list, damp: float) -> dict:
    """The output head on the final residuals: refit when untied, the final norm's weight when tied."""
    tn, sn = teacher.model.norm, student.model.norm
    head_t, head_s = teacher.lm_head, student.lm_head
    tied = head_s.weight is student.model.embed_tokens.weight
    acc = _Sums()
    for th, sh in zip(t_h, s_h, strict=True):
        x_t = _flat(tn(th))
        x = _flat(sh).double()
        u = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + sn.variance_epsilon)).float()
        acc.add(u if tied else u * sn.weight.float(), x_t)
    if tied:
        g = fit_gain(head_s.weight.float(), head_t.weight.float(), acc.H, acc.C, damp=damp)
        sn.weight.data.copy_(g.to(sn.weight.dtype))
        return {"head": "final norm weight fitted (tied embedding)"}
    _set_weight(head_s, refit(head_t.weight, acc.H, acc.C, damp=damp))
    return {"head": "refitted"}


def teacher_copy(model: nn.Module) -> nn.Module:
    """The uncut model the refits aim at (a copy: the cut works in place)."""
    return copy.deepcopy(model)
