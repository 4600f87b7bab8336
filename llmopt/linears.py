"""Linear-like modules, one view for every kernel: ``nn.Linear`` and transformers' ``Conv1D``.

Kernels work on W: (out, in), the layout of ``nn.Linear.weight``. GPT-2 style models (GPT-2,
GPT-J's ancestors, many older Hub models) use ``transformers.pytorch_utils.Conv1D``, a Linear whose
weight is stored transposed, (in, out), with ``y = x @ W + b``. These helpers hide the difference so
the engine, the stages and the savers never special-case it.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # transformers is a hard dependency; the guard only keeps this leaf module importable alone
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, *((Conv1D,) if Conv1D else ()))


def is_linear(module: nn.Module) -> bool:
    """True for modules a compression stage can target (nn.Linear, transformers Conv1D)."""
    return isinstance(module, LINEAR_TYPES)


def is_transposed(module: nn.Module) -> bool:
    """True when the stored weight is (in, out) (Conv1D) rather than (out, in)."""
    return bool(Conv1D) and isinstance(module, Conv1D)


def in_features(module: nn.Module) -> int:
    w = module.weight
    return int(w.shape[0] if is_transposed(module) else w.shape[1])


def out_features(module: nn.Module) -> int:
    w = module.weight
    return int(w.shape[1] if is_transposed(module) else w.shape[0])


def weight_oi(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), a view of the parameter's data (no copy)."""
    w = module.weight.data
    return w.t() if is_transposed(module) else w


def write_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Copy W: (out, in) into the module's weight, in its own layout and dtype."""
    weight_oi(module).copy_(W.to(module.weight.dtype))


def set_weight_tensor(module: nn.Module, W: torch.Tensor) -> None:
    """Replace the weight by W: (out, in) with W's dtype (e.g. float32 in a bfloat16 model, for saving)."""
    data = W.t().contiguous() if is_transposed(module) else W.contiguous()
    module.weight = nn.Parameter(data, requires_grad=False)
