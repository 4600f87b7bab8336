"""Hessian helpers shared by every OBS-style kernel (SparseGPT, GPTQ).

Both papers work with the layer-wise reconstruction objective ‖WX − ŴX‖², whose Hessian with respect
to one row of W is H = 2 X Xᵀ / N (X: (in, N) calibration inputs). Writing the preparation once keeps
SparseGPT and GPTQ on exactly the same numerics (llm-compressor normalises them differently).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


GRAM_BLOCK = 256  # columns per block of the block-triangular Gram update
ERROR_CHUNK = 1 << 22  # elements of (W − Ŵ) a weighted_error slice holds (16 MiB in float32)


def add_gram_upper_(H: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """H += alpha · xᵀx on H's upper block triangle only, in place: x: (T, in), H: (in, in) float32, or
    float64 to sum many batches exactly (each block's product computed in x's float32, then added).

    xᵀx is symmetric, so only the blocks on and above the diagonal (blocks of ``GRAM_BLOCK`` columns) are
    computed: about (k + 1)/(2k) of the full product for k blocks (0.58 for a 1536-wide input), the
    saving a BLAS ``syrk`` makes, with torch's own matmul on any device. Blocks below the diagonal are
    left as they are (zero when H started at zero); :func:`symmetrize_upper_` fills them once at the end.
    """
    n = H.shape[0]
    for a in range(0, n, GRAM_BLOCK):
        b = min(a + GRAM_BLOCK, n)
        if H.dtype == x.dtype:
            H[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:], alpha=alpha)
        else:  # a block of the product at a time: the temporary is GRAM_BLOCK rows, not (in, in)
            H[a:b, a:].add_(torch.mm(x[:, a:b].t(), x[:, a:]), alpha=alpha)
    return H


def packed_upper_numel(n: int) -> int:
    """Values of an (n, n) matrix's upper block triangle (blocks of ``GRAM_BLOCK`` rows: each block row from its
    diagonal block to the last column): the storage of :func:`add_gram_packed_`, about n²/2."""
    return sum((min(a + GRAM_BLOCK, n) - a) * (n - a) for a in range(0, n, GRAM_BLOCK))


def _block_rows(P: torch.Tensor, n: int):
    """(a, b, view of P as block row a:b, columns a:n) for each block row of a packed upper triangle."""
    offset = 0
    for a in range(0, n, GRAM_BLOCK):
        b = min(a + GRAM_BLOCK, n)
        size = (b - a) * (n - a)
        yield a, b, P[offset : offset + size].view(b - a, n - a)
        offset += size


def add_gram_packed_(P: torch.Tensor, n: int, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """:func:`add_gram_upper_` into packed storage (:func:`packed_upper_numel` values, typically float64): the
    same block products added to the same sums, in half the memory of an (n, n) matrix (a float64 sum for an
    8192-wide down_proj: 264 MiB instead of 512). x: (T, n)."""
    for a, _, row in _block_rows(P, n):
        row.add_(torch.mm(x[:, a : a + row.shape[0]].t(), x[:, a:]), alpha=alpha)
    return P


def unpack_upper(P: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The (n, n) matrix in ``dtype`` whose upper block triangle packed storage ``P`` holds (the rest zero),
    converted one block row at a time; :func:`symmetrize_upper_` completes it."""
    H = torch.zeros(n, n, dtype=dtype, device=P.device)
    for a, b, row in _block_rows(P, n):
        H[a:b, a:].copy_(row)
    return H


def symmetrize_upper_(H: torch.Tensor) -> torch.Tensor:
    """Copy the strict upper triangle of H onto the lower one, in place (completes :func:`add_gram_upper_`).

    A block of ``GRAM_BLOCK`` rows at a time, so the temporaries are that size, not three (in, in) matrices
    (at an 8192-wide down_proj those were 768 MiB beside the Hessian). Every value is then ``+ 0.0``, as
    ``triu(H) + triu(H, 1)ᵀ`` made it (a −0.0 becomes +0.0): the same bits as that formula."""
    n = H.shape[0]
    for a in range(0, n, GRAM_BLOCK):
        b = min(a + GRAM_BLOCK, n)
        d = H[a:b, a:b]
        d.copy_(d.triu() + d.triu(1).t())
        H[b:, a:b].copy_(H[a:b, b:].t())
    return H.add_(0.0)


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    """Input columns that never fired in calibration (diag H == 0): (in,) bool.

    GPTQ §4 / IST-DASLab code: their weights can be anything without changing the outputs, so kernels
    set them to zero and give H a unit diagonal there so it stays invertible.
    """
    return torch.diag(H) == 0


def inverse_hessian_cholesky(
    H: torch.Tensor | None,
    damp: float = 0.01,
    max_tries: int = 6,
    name: str | None = None,
    fresh: Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = damp·mean(diag H): (in, in) float32.

    SparseGPT §3.3 / GPTQ §3 ("Cholesky reformulation"): the rows of U give, for each column q, the
    quantities [H⁻¹_F]_qq and the error-propagation row needed after eliminating columns < q, without
    ever re-inverting. ``H`` must already have dead columns given a unit diagonal. If the factorisation
    fails (H numerically indefinite, e.g. few samples), the damping is multiplied by 10 and retried;
    returns the damping actually used so callers can report it. When the retry raised it, one warning
    names the Linear (``name``) and both values: at 1000× the configured damping the OBS update is
    nearly RTN.

    ``fresh`` (instead of ``H``): makes a new float32 H for each try, which the factorisation then consumes, so
    a caller need not hold a prepared copy of H beside the factors (one (in, in) matrix fewer at the peak:
    256 MiB for an 8192-wide down_proj). The result is the same bits.
    """
    if fresh is None:
        H32 = H.to(torch.float32)
        fresh = H32.clone
    mean_diag = None
    configured = damp
    for _ in range(max_tries):
        try:
            # (in, in) temporaries one at a time: H + λI, then L, then H⁻¹ (a 1536-wide Hessian is 9 MiB each)
            L = fresh()
            if mean_diag is None:
                mean_diag = torch.mean(torch.diag(L)).item()
            L.diagonal().add_(damp * mean_diag)
            if L.device.type == "cpu":
                U = _inverse_cholesky_in_place(L)
            else:
                L = torch.linalg.cholesky(L)
                L = torch.cholesky_inverse(L)
                U = torch.linalg.cholesky(L, upper=True)
            del L
        except torch.linalg.LinAlgError:
            log.debug("Cholesky failed for %s with damp=%g; retrying with damp=%g", name or "H", damp, damp * 10)
            damp *= 10
            continue
        if damp != configured:
            log.warning(
                "%s: Hessian not positive definite with damp=%g; used damp=%g (%gx the configured value%s)",
                name or "Linear",
                configured,
                damp,
                damp / configured,
                "; the result is close to round-to-nearest" if damp >= 1000 * configured else "",
            )
        return U, damp
    raise torch.linalg.LinAlgError(f"{name or 'Hessian'}: not positive definite even with damp={damp:g}")


def _inverse_cholesky_in_place(A: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of A⁻¹ for a symmetric positive definite float32 A, computed in A's own memory.

    torch's LAPACK calls work on column-major matrices and copy anything else into a new one; a symmetric
    matrix read column-major (``A.mT``) is itself, so handing that view to the ``out=`` forms runs potrf, potri
    and potrf in place: one (in, in) matrix at the peak instead of two (256 MiB less at an 8192-wide
    down_proj), and the very bits of ``cholesky`` → ``cholesky_inverse`` → ``cholesky(upper=True)`` (whose
    result is column-major too). Raises LinAlgError when A is not positive definite."""
    C = A.mT  # column-major view of the same symmetric matrix
    info = torch.zeros((), dtype=torch.int32)
    torch.linalg.cholesky_ex(C, out=(C, info))  # lower factor L, A = L Lᵀ
    if info.item():
        raise torch.linalg.LinAlgError(f"not positive definite (leading minor {info.item()})")
    torch.cholesky_inverse(C, out=C)  # A⁻¹
    torch.linalg.cholesky_ex(C, upper=True, out=(C, info))
    if info.item():
        raise torch.linalg.LinAlgError(f"inverse not positive definite (leading minor {info.item()})")
    return C


def prepare(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy W (out, in) and H (in, in) to float32, zero dead columns of W and unit-diagonal them in H.

    Returns (W, H, dead) with dead: (in,) bool.
    """
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float32).clone()
    dead = dead_columns(H)
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H, dead


def prepare_weight(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prepare`'s W (a float32 copy, dead columns zeroed) and the dead columns, without copying H."""
    dead = dead_columns(H)
    W = W.detach().to(torch.float32).clone()
    W[:, dead] = 0.0
    return W, dead


def hessian_in_walk_order(H: torch.Tensor, dead: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """A float32 copy of :func:`prepare`'s H (dead columns on a unit diagonal), its rows and columns in
    ``order`` (None: as they are): the same values :func:`prepare` then ``H[order][:, order]`` give, made as one
    (in, in) matrix instead of two."""
    if order is None:
        out = H.detach().to(torch.float32).clone()
    else:  # a block of rows at a time: H[order[:, None], order] at once held ~half an (in, in) matrix more
        n = H.shape[0]
        out = torch.empty(n, n, dtype=torch.float32, device=H.device)
        for a in range(0, n, GRAM_BLOCK):
            rows = H.detach().index_select(0, order[a : a + GRAM_BLOCK]).to(torch.float32)
            torch.index_select(rows, 1, order, out=out[a : a + GRAM_BLOCK])
        dead = dead[order]
    out[dead, dead] = 1.0
    return out


def weighted_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W−Ŵ) H (W−Ŵ)ᵀ): the layer's output reconstruction error under calibration inputs."""
    H = H.to(torch.float32)
    total = 0.0
    # float32 matmuls (float64 on CPU took ~13% of a GPTQ call), the sums of their products in float64; in
    # slices of rows, so the temporaries stay small beside an (in, in) H (three (out, in) ones otherwise)
    step = max(1, ERROR_CHUNK // max(W.shape[1], 1))
    for r in range(0, W.shape[0], step):
        D = (W[r : r + step] - W_hat[r : r + step]).to(torch.float32)  # (rows, in)
        total += float(((D @ H) * D).sum(dtype=torch.float64))
    return total
