"""Calibration statistics of the Linears' inputs, accumulated by forward pre-hooks."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from llmopt.calibration.capture import StopForward
from llmopt.core.state import LinearStats
from llmopt.kernels.hessian import add_gram_upper_, symmetrize_upper_


class StatsAccumulator:
    """Forward pre-hooks on Linears that accumulate the statistic a stage needs from their inputs.

    Hessian as a running average in float32 (IST-DASLab ``add_batch``): after N tokens
    H = 2/N Σ_n x_nᵀ x_n, so its scale does not depend on how many windows were used. Linears fed by
    the same tensor (q/k/v, gate/up) share one accumulation. Once every hooked Linear has seen its
    input, the layer's forward is cut short (:class:`StopForward`): the rest of the layer, e.g.
    down_proj's matmul, is not needed for statistics.

    Given the same batch's inputs in the uncompressed model (``new_forward(fp_inputs)``, from
    :class:`~llmopt.calibration.fp_stream.FPStream`), a Hessian also accumulates GPTAQ's asymmetry term
    G = 2/N Σ_n (x_n − x̃_n)ᵀ x̃_n (``LinearStats.dxxt``, x̃ the input here, x the uncompressed model's), the same
    way and with the same N, so G H⁻¹ does not depend on the number of windows.
    """

    def __init__(
        self, linears: dict[str, nn.Module], statistic: str, first_token_weight: dict[str, float] | None = None
    ):
        self.statistic = statistic
        # Linear name → weight of each window's first token in its Hessian, as a fraction of the window's
        # token count (see GPTQStageConfig.sink_weight). Such a Linear shares the plain accumulation with
        # the Linears that read the same tensor and adds a low-rank term of its own: with the first token
        # counted s² times, H' = H + 2/N (s² − 1) Σ_windows x₀ᵀx₀ (`_extra`, the raw sum, N = H's tokens).
        self._first = {n: w for n, w in (first_token_weight or {}).items() if w > 0}
        self._extra: dict[str, torch.Tensor] = {}
        self._extra_dxxt: dict[str, torch.Tensor] = {}  # the same low-rank term for G: (s² − 1) Σ (x₀ − x̃₀)ᵀx̃₀
        self._fp: dict[str, torch.Tensor] | None = None  # this forward's inputs in the uncompressed model
        self.stats: dict[str, LinearStats] = {}
        self._partial: set[str] = set()  # Hessians holding only their upper triangle so far (add_gram_upper_)
        self._alias: dict[str, str] = {}  # linear name → name whose stats it shares
        self._handles = [lin.register_forward_pre_hook(self._hook(name)) for name, lin in linears.items()]
        self._n = len(linears)
        self._seen: set[str] = set()
        # The previous hooked input and who accumulated it. Holding the tensor itself (not its address)
        # matters: a freed activation's memory is reused by the next one of the same shape, so an
        # address comparison would merge the statistics of unrelated Linears.
        self._last: tuple[torch.Tensor, str] | None = None

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if self._last is not None and self._last[0] is x:
                self._alias[name] = self._last[1]  # q/k/v (gate/up) read the very same tensor
            else:
                self._last = (x, name)
                fp = None if self._fp is None else self._fp[name].reshape(-1, x.shape[-1])
                self._add(name, x.detach().reshape(-1, x.shape[-1]), fp)
            if name in self._first and x.dim() == 3 and self.statistic == "hessian":  # x: (windows, tokens, in)
                x0 = x.detach()[:, 0].to(torch.float32)  # (windows, in)
                s2 = max(1.0, self._first[name] * x.shape[1])
                e = self._extra.setdefault(name, torch.zeros(x.shape[-1], x.shape[-1], device=x0.device))
                e.addmm_(x0.t(), x0, alpha=s2 - 1.0)
                if self._fp is not None:
                    d0 = self._fp[name][:, 0].to(torch.float32) - x0  # (windows, in)
                    e = self._extra_dxxt.setdefault(name, torch.zeros_like(e))
                    e.addmm_(d0.t(), x0, alpha=s2 - 1.0)
            self._seen.add(name)
            if len(self._seen) == self._n:
                raise StopForward

        return hook

    @torch.no_grad()
    def _add(self, name: str, x: torch.Tensor, fp: torch.Tensor | None = None) -> None:
        x = x.to(torch.float32)  # (T, in)
        s = self.stats.setdefault(name, LinearStats())
        t = x.shape[0]
        if self.statistic == "hessian":
            if s.hessian is None:
                s.hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            s.hessian.mul_(s.tokens / (s.tokens + t))
            add_gram_upper_(s.hessian, x, alpha=2.0 / (s.tokens + t))  # the lower triangle is filled in get()
            self._partial.add(name)
            if fp is not None:  # GPTAQ: G = 2/N Σ (x − x̃)ᵀ x̃, (in, in), not symmetric
                if s.dxxt is None:
                    s.dxxt = torch.zeros_like(s.hessian)
                s.dxxt.mul_(s.tokens / (s.tokens + t))
                s.dxxt.addmm_((fp.to(torch.float32) - x).t(), x, alpha=2.0 / (s.tokens + t))
        elif self.statistic == "act_sq_norm":
            if s.act_sq_norm is None:
                s.act_sq_norm = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
            s.act_sq_norm.add_((x * x).sum(0))
        s.tokens += t

    def new_forward(self, fp_inputs: dict[str, torch.Tensor] | None = None) -> None:
        """Before each batch; ``fp_inputs``: that batch's inputs of the hooked Linears in the uncompressed
        model (name → (B, L, in)), to accumulate GPTAQ's G beside the Hessian."""
        self._fp = fp_inputs
        self._last = None
        self._seen.clear()

    def get(self, name: str) -> LinearStats:
        key = self._alias.get(name, name)
        st = self.stats[key]
        if key in self._partial:  # once, after the last window: the accumulation filled the upper triangle
            symmetrize_upper_(st.hessian)
            self._partial.discard(key)
        if name not in self._extra:
            return st
        extra = self._extra_dxxt.get(name)
        dxxt = st.dxxt if extra is None else st.dxxt + extra * (2.0 / st.tokens)
        return replace(st, hessian=st.hessian + self._extra[name] * (2.0 / st.tokens), dxxt=dxxt)

    def all_reduce(self) -> None:
        """Under ``torchrun`` (:mod:`llmopt.parallel`): each process accumulated its own windows; afterwards
        every process holds the statistics of all of them, as one process would have accumulated them (up
        to the summation order). Call once, after the last forward and before :meth:`get`."""
        from llmopt import parallel

        if not parallel.current().active:
            return
        # Every process must take part in the same collectives in the same order: agree on the names first
        # (a Linear may have run on one process's windows only, e.g. an expert its tokens never reached).
        mine = {
            n: (
                s.hessian.shape[0] if s.hessian is not None else None,
                s.act_sq_norm.shape[0] if s.act_sq_norm is not None else None,
                s.dxxt is not None,
            )
            for n, s in self.stats.items()
        }
        extras = {n: e.shape[0] for n, e in self._extra.items()}
        extras_g = {n: e.shape[0] for n, e in self._extra_dxxt.items()}
        gathered = parallel.all_gather_objects((mine, extras, extras_g, self._alias))
        shapes: dict[str, tuple] = {}
        for m, _, _, alias in gathered:
            for n, meta in m.items():
                shapes.setdefault(n, meta)
            self._alias.update(alias)
        for name in sorted(shapes):
            h_in, a_in, has_dxxt = shapes[name]
            s = self.stats.setdefault(name, LinearStats())
            count = torch.tensor([s.tokens], dtype=torch.int64)
            parallel.all_reduce_sum_(count)
            total = int(count.item())
            if h_in is not None:  # running averages over each process's tokens → sums → the average of all
                for field in ("hessian",) + (("dxxt",) if has_dxxt else ()):
                    t = getattr(s, field)
                    t = torch.zeros(h_in, h_in) if t is None else t.mul_(s.tokens)
                    setattr(s, field, parallel.all_reduce_sum_(t).div_(max(total, 1)))
                self._partial.add(name)  # every process summed upper triangles; get() fills the lower one
            if a_in is not None:  # a raw sum
                s.act_sq_norm = parallel.all_reduce_sum_(torch.zeros(a_in) if s.act_sq_norm is None else s.act_sq_norm)
            s.tokens = total
        for table, index in ((self._extra, 1), (self._extra_dxxt, 2)):  # raw sums of the first tokens' terms
            names = sorted({n for g in gathered for n in g[index]})
            for n in names:
                width = next(g[index][n] for g in gathered if n in g[index])
                table[n] = parallel.all_reduce_sum_(table.get(n, torch.zeros(width, width)))

    def has(self, name: str) -> bool:
        """False for a Linear that never ran (no statistics)."""
        return self._alias.get(name, name) in self.stats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
