"""Calibration activations spilled to disk when they would not fit in memory.

The engine keeps every calibration window's hidden state between decoder layers (one tensor per batch,
overwritten in place by each layer's outputs) and, for GPTAQ, a second copy for the uncompressed model. That is
windows x tokens x hidden x the dtype's bytes per copy: 32 x 512 windows of an 8192-wide model in bfloat16 are
256 MiB, but 512 x 2048 windows are 16 GiB. When the copies need more than half of the memory left at capture
time (:func:`llmopt.memory.available_mib`: MemAvailable, the memory cgroup, RLIMIT_AS), each batch's hidden
state is held in a memory-mapped file instead (``torch.from_file(shared=True)``): the kernel writes its pages
back to disk and drops them under memory pressure, and reads them in again when the next layer runs on the
batch. The files are unlinked as soon as they are mapped, so nothing is left on disk, whatever ends the run;
their space is returned when the engine drops the batches. The values are the same either way (a mapped tensor
is an ordinary CPU tensor): spilled and in-memory runs store the same codes bit for bit (tested).

Where: ``$LLMOPT_SPILL_DIR``, else llmopt's cache root (a disk folder; ``/tmp`` may be memory itself).
When: ``$LLMOPT_SPILL`` = ``auto`` (the default, as above), ``always`` or ``never``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from llmopt import memory
from llmopt.errors import LLMOptError
from llmopt.models.specs import cache_root

log = logging.getLogger(__name__)

#: spill when the activations need more than this share of the memory available at capture time
SPILL_FRACTION = 0.5
MODES = ("auto", "always", "never")


def spill_folder() -> Path:
    """Where spilled activations go: ``$LLMOPT_SPILL_DIR`` or ``<llmopt cache>/activations``."""
    env = os.environ.get("LLMOPT_SPILL_DIR")
    return Path(env).expanduser() if env else cache_root() / "activations"


class ActivationStore:
    """Holds the engine's hidden states: in memory, or in memory-mapped files (:meth:`hold`).

    ``windows``: how many windows the engine holds (this process's share under torchrun); ``copies``: hidden
    states held per window (2 with GPTAQ's second stream). The choice is made at the first :meth:`hold`, from
    that batch's bytes per window, and kept for the run."""

    def __init__(self, windows: int, copies: int = 1, mode: str | None = None):
        mode = (mode or os.environ.get("LLMOPT_SPILL") or "auto").lower()
        if mode not in MODES:
            raise LLMOptError(f"LLMOPT_SPILL={mode!r} is not one of {', '.join(MODES)}")
        self.windows, self.copies, self.mode = windows, copies, mode
        self.folder: Path | None = None
        self.spilled: bool | None = None  # decided at the first hold
        self.bytes_held = 0

    def _decide(self, t: torch.Tensor) -> bool:
        if t.device.type != "cpu" or self.mode == "never":
            return False
        if self.mode == "always":
            return True
        need_mib = t.nbytes / max(t.shape[0], 1) * self.windows * self.copies / 2**20
        avail = memory.available_mib()
        if avail is None or need_mib <= SPILL_FRACTION * avail:
            return False
        log.warning(
            "calibration activations need %.2f GiB, more than %d%% of the %.2f GiB available: held in "
            "memory-mapped files under %s (set LLMOPT_SPILL_DIR to move them)",
            need_mib / 1024, round(100 * SPILL_FRACTION), avail / 1024, spill_folder(),
        )  # fmt: skip
        return True

    def hold(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as the engine should keep it: ``t`` itself in memory, or a file-backed copy when spilling."""
        if self.spilled is None:
            self.spilled = self._decide(t)
        if not self.spilled:
            return t
        if self.folder is None:
            root = spill_folder()
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                msg = f"cannot create {root} for spilled activations ({e.strerror}): set LLMOPT_SPILL_DIR"
                raise LLMOptError(msg) from None
            self.folder = root
        fd, name = tempfile.mkstemp(prefix="llmopt-activations-", suffix=".bin", dir=self.folder)
        os.close(fd)
        try:
            mapped = torch.from_file(name, shared=True, size=t.numel(), dtype=t.dtype)
        finally:
            os.unlink(name)  # the mapping keeps the pages; nothing stays on disk once it is dropped
        out = mapped.view(t.shape)
        out.copy_(t)
        self.bytes_held += t.nbytes
        return out

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` held like :meth:`hold` holds (GPTAQ's second stream)."""
        held = self.hold(t)
        return t.clone() if held is t else held
