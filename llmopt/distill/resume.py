"""Training checkpoints a rerun resumes from (``llmopt compress ... --resume``).

They live in ``<output>.ckpt/`` beside the output folder (which stays atomic: it appears only when the
whole compression succeeded), one ``step-NNNNNNN/`` folder per checkpoint plus ``latest.json`` naming the
newest; ``compress`` removes the folder once the output is saved. A checkpoint holds what the next step
depends on, in safetensors and JSON only (nothing is unpickled):

* ``tensors.safetensors``: the trained parameters (latent weights of fake-quantized Linears, learned
  scales), AdamW's per-parameter state, the current masks (gradual sparsity changes them) and the
  Wanda activation sums since the last mask update;
* ``state.json``: step, tokens, seconds spent, updates of the sparsity schedule done, the loss curve so
  far, AdamW's hyper-parameters, and the run's key: a hash of the recipe, the model spec, the teacher's
  weights and the distillation windows. A checkpoint with another key is not resumed.

Folders are written under a temporary name, fsynced and renamed, then ``latest.json`` is replaced the
same way (:func:`llmopt.atomic.atomic_write`), so a SIGKILL at any moment leaves the previous checkpoint
intact.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llmopt import atomic
from llmopt.errors import LLMOptError, read_json
from llmopt.safetensors_io import write_safetensors

LATEST = "latest.json"


def checkpoint_dir(output: str | Path) -> Path:
    out = Path(output)
    return out.parent / f"{out.name}.ckpt"


@dataclass
class LoopState:
    """The loop's counters and history (JSON)."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    gradual_done: int = 0
    resumed_from: int | None = None
    curve: dict = field(default_factory=lambda: {"train": [], "heldout": []})


@dataclass
class Checkpoint:
    loop: LoopState
    params: dict[str, torch.Tensor]
    optimizer: dict
    masks: dict[str, torch.Tensor]
    act_sq: dict[str, torch.Tensor]


def save(
    folder: Path,
    key: str,
    loop: LoopState,
    params: dict[str, torch.Tensor],
    optimizer: dict,
    masks: dict[str, torch.Tensor],
    act_sq: dict[str, torch.Tensor],
) -> Path:
    """Write a checkpoint of step ``loop.step`` and make it the latest; older ones are removed."""

    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{loop.step:07d}"
    tensors = {f"p.{n}": t.detach() for n, t in params.items()}
    tensors.update({f"m.{n}": m.detach() for n, m in masks.items()})  # bool (safetensors BOOL)
    tensors.update({f"a.{n}": a.detach() for n, a in act_sq.items()})
    opt_json = {}
    for i, st in optimizer["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"o.{i}.{k}"] = v.detach()
            else:
                opt_json.setdefault(str(i), {})[k] = v
    meta = {"key": key, "loop": asdict(loop), "param_groups": optimizer["param_groups"], "opt_scalars": opt_json}
    final = folder / name
    with atomic.atomic_write(final, kind="folder") as tmp:
        # one tensor at a time: save_file would hold a second copy of every parameter and moment in memory
        write_safetensors(
            tmp / "tensors.safetensors", [(n, tuple(t.shape), t.dtype, lambda t=t: t) for n, t in tensors.items()]
        )
        (tmp / "state.json").write_text(json.dumps(meta))
    atomic.write_text(folder / LATEST, json.dumps({"checkpoint": name, "key": key}))
    for old in folder.iterdir():  # previous checkpoints, leftovers of killed writers
        if old.name not in (name, LATEST):
            atomic.remove(old)
    return final


def load(folder: Path, key: str) -> Checkpoint | None:
    """The latest checkpoint in ``folder`` (None when there is none); one-line error when it belongs to
    another run (recipe, model, teacher or data changed)."""
    from safetensors.torch import load_file

    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    latest = read_json(pointer, "checkpoint index")
    path = folder / str(latest.get("checkpoint", ""))
    if latest.get("key") != key:
        raise LLMOptError(
            f"checkpoint {folder} was written by another run (recipe, model, teacher or data differ): "
            "remove it, or run without --resume to start over"
        )
    if not (path / "state.json").is_file() or not (path / "tensors.safetensors").is_file():
        raise LLMOptError(f"checkpoint {path} is incomplete: remove {folder} or run without --resume")
    meta = read_json(path / "state.json", "checkpoint state")
    tensors = load_file(str(path / "tensors.safetensors"))
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("o."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    for i, scalars in meta["opt_scalars"].items():
        state.setdefault(int(i), {}).update(scalars)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    return Checkpoint(
        loop=LoopState(**meta["loop"]),
        params=part("p."),
        optimizer={"state": state, "param_groups": meta["param_groups"]},
        masks={k: v.to(torch.bool) for k, v in part("m.").items()},
        act_sq=part("a."),
    )


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
