"""Calibration statistics of the Linears' inputs, accumulated by forward pre-hooks."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from llmopt.calibration.capture import StopForward
from llmopt.core.state import LinearStats
from llmopt.kernels.hessian import add_gram_packed_, packed_upper_numel, symmetrize_upper_, unpack_upper


class StatsAccumulator:
    """Forward pre-hooks on Linears that accumulate the statistic a stage needs from their inputs.

    The Hessian H = 2/N Σ_n x_nᵀ x_n (IST-DASLab ``add_batch``: its scale does not depend on how many windows
    were used). Each batch's Gram matrix is computed in float32 (on its upper block triangle,
    :func:`~llmopt.kernels.hessian.add_gram_packed_`) and added to a float64 sum stored packed (the upper block
    triangle only: half an (in, in) matrix); :meth:`get` divides by N
    and rounds to float32 once. Float64 holds a sum of a few hundred float32 terms of similar size exactly,
    so the result does not depend on the order the batches were added in: two processes each summing half
    the batches (:meth:`all_reduce`, :mod:`llmopt.parallel`) give the one-process Hessian bit for bit.
    Linears fed by the same tensor (q/k/v, gate/up) share one accumulation. Once every hooked Linear has
    seen its input, the layer's forward is cut short (:class:`StopForward`): the rest of the layer, e.g.
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
        self._extra: dict[str, torch.Tensor] = {}  # float64 sums
        self._extra_dxxt: dict[str, torch.Tensor] = {}  # the same low-rank term for G: (s² − 1) Σ (x₀ − x̃₀)ᵀx̃₀
        self._fp: dict[str, torch.Tensor] | None = None  # this forward's inputs in the uncompressed model
        # While accumulating, a LinearStats holds float64 *sums* (2 Σ xᵀx on the upper triangle, 2 Σ (x − x̃)ᵀx̃,
        # Σ x²); get() turns them into the float32 statistics once (names in _open until then).
        self.stats: dict[str, LinearStats] = {}
        self._open: set[str] = set()
        self._alias: dict[str, str] = {}  # linear name → name whose stats it shares
        self._width: dict[str, int] = {}  # name → input width of its packed Hessian sum
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
                _add64(self._extra, name, torch.mm(x0.t(), x0).mul_(s2 - 1.0))
                if self._fp is not None:
                    d0 = self._fp[name][:, 0].to(torch.float32) - x0  # (windows, in)
                    _add64(self._extra_dxxt, name, torch.mm(d0.t(), x0).mul_(s2 - 1.0))
            self._seen.add(name)
            if len(self._seen) == self._n:
                raise StopForward

        return hook

    @torch.no_grad()
    def _add(self, name: str, x: torch.Tensor, fp: torch.Tensor | None = None) -> None:
        x = x.to(torch.float32)  # (T, in)
        s = self.stats.setdefault(name, LinearStats())
        self._open.add(name)
        if self.statistic == "hessian":
            n = x.shape[1]
            if s.hessian is None:  # the float64 sum of the upper block triangle, packed (half an (n, n) matrix)
                s.hessian = torch.zeros(packed_upper_numel(n), dtype=torch.float64, device=x.device)
                self._width[name] = n
            add_gram_packed_(s.hessian, n, x, alpha=2.0)  # the lower triangle is filled in get()
            if fp is not None:  # GPTAQ: G = 2/N Σ (x − x̃)ᵀ x̃, (in, in), not symmetric
                s.dxxt = _sum64(s.dxxt, torch.mm((fp.to(torch.float32) - x).t(), x).mul_(2.0))
        elif self.statistic == "act_sq_norm":
            s.act_sq_norm = _sum64(s.act_sq_norm, (x * x).sum(0))
        s.tokens += x.shape[0]

    def new_forward(self, fp_inputs: dict[str, torch.Tensor] | None = None) -> None:
        """Before each batch; ``fp_inputs``: that batch's inputs of the hooked Linears in the uncompressed
        model (name → (B, L, in)), to accumulate GPTAQ's G beside the Hessian."""
        self._fp = fp_inputs
        self._last = None
        self._seen.clear()

    def _close(self, key: str) -> None:
        """The float64 sums of ``key`` → its float32 statistics (once, after the last window)."""
        st = self.stats[key]
        n = max(st.tokens, 1)
        if st.hessian is not None:  # the packed float64 sum → the (in, in) float32 Hessian
            # rounded to float32 while still packed, then unpacked: the same values, and the float64 sum is gone
            # before the (in, in) matrix exists (264 + 132 MiB at the peak for an 8192-wide down_proj, not 264 + 256)
            packed, st.hessian = st.hessian.div_(n), None
            packed = packed.to(torch.float32)
            st.hessian = symmetrize_upper_(unpack_upper(packed, self._width[key], torch.float32))
            del packed
        if st.dxxt is not None:
            st.dxxt = st.dxxt.div_(n).to(torch.float32)
        if st.act_sq_norm is not None:
            st.act_sq_norm = st.act_sq_norm.to(torch.float32)
        self._open.discard(key)

    def get(self, name: str) -> LinearStats:
        key = self._alias.get(name, name)
        if key in self._open:
            self._close(key)
        st = self.stats[key]
        if name not in self._extra:
            return st
        scale = 2.0 / st.tokens
        hessian = st.hessian + (self._extra[name] * scale).to(torch.float32)
        extra = self._extra_dxxt.get(name)
        dxxt = st.dxxt if extra is None else st.dxxt + (extra * scale).to(torch.float32)
        return replace(st, hessian=hessian, dxxt=dxxt)

    def all_reduce(self) -> None:
        """Under ``torchrun`` (:mod:`llmopt.parallel`): each process accumulated its own windows; afterwards
        every process holds the sums of all of them, exactly those one process would have made (float64
        sums: the order does not matter). Call once, after the last forward and before :meth:`get`."""
        from llmopt import parallel

        if not parallel.current().active:
            return

        # Every process must take part in the same collectives in the same order: agree on the names first
        # (a Linear may have run on one process's windows only, e.g. an expert its tokens never reached).
        def shapes(st: LinearStats) -> dict:
            return {
                f: tuple(getattr(st, f).shape) for f in ("hessian", "dxxt", "act_sq_norm") if getattr(st, f) is not None
            }

        mine = {n: shapes(st) for n, st in self.stats.items()}
        extras = [{n: tuple(e.shape) for n, e in table.items()} for table in (self._extra, self._extra_dxxt)]
        gathered = parallel.all_gather_objects((mine, extras, self._alias, self._width))
        fields: dict[str, dict] = {}
        for m, _, alias, width in gathered:
            for n, f in m.items():
                fields.setdefault(n, {}).update(f)
            self._alias.update(alias)
            self._width.update(width)
        device = next((t.device for st in self.stats.values() for t in vars(st).values() if torch.is_tensor(t)), None)
        for name in sorted(fields):
            st = self.stats.setdefault(name, LinearStats())
            self._open.add(name)
            count = torch.tensor([st.tokens], dtype=torch.int64, device=device)
            st.tokens = int(parallel.all_reduce_sum_(count).item())
            for f, shape in sorted(fields[name].items()):
                t = getattr(st, f)
                t = torch.zeros(shape, dtype=torch.float64, device=device) if t is None else t
                setattr(st, f, parallel.all_reduce_sum_(t))
        for k, table in enumerate((self._extra, self._extra_dxxt)):
            names = sorted({n for g in gathered for n in g[1][k]})
            for n in names:
                shape = next(g[1][k][n] for g in gathered if n in g[1][k])
                t = table.get(n)
                t = torch.zeros(shape, dtype=torch.float64, device=device) if t is None else t
                table[n] = parallel.all_reduce_sum_(t)

    def release(self) -> None:
        """Forget every statistic still held (after the group's kernels): a caller's references are then the only
        ones."""
        self.stats.clear()
        self._extra.clear()
        self._extra_dxxt.clear()
        self._fp = self._last = None

    def forget(self, name: str, keep_for: list[str] = ()) -> None:
        """Drop what this object holds of ``name``'s statistics, unless a Linear in ``keep_for`` shares them (q/k/v
        share one Hessian): once the caller is done with it too, it is freed."""
        key = self._alias.get(name, name)
        self._extra.pop(name, None)
        self._extra_dxxt.pop(name, None)
        if not any(self._alias.get(n, n) == key for n in keep_for):
            self.stats.pop(key, None)
            self._open.discard(key)

    def has(self, name: str) -> bool:
        """False for a Linear that never ran (no statistics)."""
        return self._alias.get(name, name) in self.stats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _sum64(acc: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    """``acc + term`` as a float64 sum (``acc`` None: a new one)."""
    if acc is None:
        return term.to(torch.float64)
    return acc.add_(term)


def _add64(table: dict[str, torch.Tensor], name: str, term: torch.Tensor) -> None:
    table[name] = _sum64(table.get(name), term)
