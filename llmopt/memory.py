"""Resident memory of this process: the peak since a reset (VmHWM) and, per phase of a run, the peak a
background sampler saw (which phase the peak belongs to is what a user trimming memory needs to know).

Linux only (``/proc/self``); elsewhere the sampler records nothing and the peak falls back to
``getrusage``. The sampler reads ``/proc/self/statm`` every ``interval`` seconds: a spike shorter than
that can be missed per phase, never in the overall VmHWM peak."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
import threading
from contextlib import contextmanager

_PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 4096 / 2**20


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count (Linux: writing 5 to /proc/self/clear_refs resets VmHWM), so the
    peak reported for a ``compress`` call is that call's, not whatever the process did before it (a
    test session, a notebook that held another model). False where the platform cannot reset it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident memory of this process since the last :func:`reset_peak_rss`, MiB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this process's own address space.
    ``getrusage().ru_maxrss`` is not used there: it survives fork + exec (a process started by a big
    parent would report the parent's peak) and cannot be reset.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def rss_mib() -> float | None:
    """Resident memory now, MiB (None off Linux)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_MIB
    except (OSError, IndexError, ValueError):
        return None


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


_LIBC = _libc()


def release_freed_memory() -> None:
    """Hand memory freed by the last layer back to the OS (glibc ``malloc_trim``).

    A layer's temporaries (activations of each batch, Hessians, the kernels' work arrays: tens to
    hundreds of MiB) are freed when it is done, but glibc keeps freed heap pages for reuse, and after
    it frees a large block it raises its mmap threshold (up to 32 MiB), so later blocks of that size come
    from the heap too; over 30 layers the resident size then grows by whatever fragmentation leaves
    behind. The engine trims after each layer's statistics pass and after each layer: milliseconds each.

    Not done: a fixed small mmap threshold (1 MiB, so every temporary goes back to the OS when freed).
    It lowered the embedded model's gptq-q4_0 peak by ~100 MiB at 4 windows per forward, but every
    temporary of 1 MiB or more was then page-faulted in afresh and unmapped again (a layer forward
    allocates ~100 MiB of them): the engine ran ~22% slower (gptq-w3g64 102 s vs 80 s back to back).
    Two windows per forward (the calibration default) keeps the transients small instead. A no-op off glibc."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


LOW_MEMORY_MMAP_THRESHOLD = 4 << 20  # bytes: blocks this large or larger are mapped and unmapped on their own


def return_large_blocks() -> bool:
    """From now on, glibc serves every block of ``LOW_MEMORY_MMAP_THRESHOLD`` bytes or more with its own mapping,
    returned to the OS when freed (``mallopt(M_MMAP_THRESHOLD)``, which also stops glibc from raising that
    threshold after large frees); for the rest of the process. The streamed (``--low-memory``) compression
    calls it.

    Measured on a 1.7B-shape model streamed (gptq-q4_0, 32 x 512 calibration tokens, traced per layer and
    phase): with glibc's default the heap held 650-850 MiB during a layer's statistics pass, a few hundred of
    them freed blocks between live ones (the activations and Hessian sums are 8-32 MiB blocks, under the raised
    threshold) and a 6-layer model of that shape peaked at 1685 MiB, its layers' peaks growing 1446 -> 1604;
    with 4 MiB, 1553 MiB (the layers ~1.4 GiB each, flat), in 303 s instead of 293 (freed blocks are faulted
    in afresh), the same output bit for bit. Not for the in-memory path: there the model itself dominates and
    each forward's temporaries would be faulted in afresh for little (see release_freed_memory).
    False where it cannot be set (not glibc)."""
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return False
    M_MMAP_THRESHOLD = -3  # glibc malloc.h
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, LOW_MEMORY_MMAP_THRESHOLD))


_ACTIVE: list[PhaseSampler] = []  # the sampler of the running compress() call, if any


@contextmanager
def phase(name: str):
    """Attribute what runs inside to phase ``name`` of the active sampler (a no-op without one)."""
    if not _ACTIVE:
        yield
        return
    with _ACTIVE[-1].phase(name):
        yield


def switch_phase(name: str) -> None:
    """Attribute what runs from now on to phase ``name``, until the enclosing :func:`phase` ends (a no-op
    without a sampler): one phase following another inside a function, without a ``with`` block each."""
    if _ACTIVE:
        _ACTIVE[-1].switch(name)


def phase_peaks() -> dict[str, float]:
    """Peak RSS per phase so far of the active sampler, MiB (empty without one)."""
    return {k: round(v, 1) for k, v in _ACTIVE[-1].peaks.items()} if _ACTIVE else {}


class PhaseSampler:
    """Peak RSS per named phase, sampled by a daemon thread (``with sampler.phase("load"): ...``)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peaks: dict[str, float] = {}
        self._phase: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        phase, now = self._phase, rss_mib()
        if phase is not None and now is not None and now > self.peaks.get(phase, 0.0):
            self.peaks[phase] = now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> PhaseSampler:
        if rss_mib() is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llmopt-rss", daemon=True)
            self._thread.start()
        _ACTIVE.append(self)
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if self._thread is not None:
            self._thread.join()
        return {k: round(v, 1) for k, v in self.peaks.items()}

    def __enter__(self) -> PhaseSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def switch(self, name: str) -> None:
        self._sample()
        self._phase = name
        self._sample()

    @contextmanager
    def phase(self, name: str):
        prev, self._phase = self._phase, name
        self._sample()
        try:
            yield
        finally:
            self._sample()
            self._phase = prev


def _cgroup_limits() -> list[float]:
    """MiB the memory cgroups of this process still allow (v2 ``memory.max``, v1 ``memory.limit_in_bytes``),
    for its own cgroup as /proc/self/cgroup names it."""
    out: list[float] = []
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return out
    for parts in lines:
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: mounted at /sys/fs/cgroup or (hybrid) /sys/fs/cgroup/unified
            candidates = [
                (f"{root}{path}/memory.max", f"{root}{path}/memory.current")
                for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
            ]
        elif "memory" in controllers.split(","):
            base = f"/sys/fs/cgroup/memory{path}"
            candidates = [(f"{base}/memory.limit_in_bytes", f"{base}/memory.usage_in_bytes")]
        else:
            continue
        for limit, usage in candidates:
            try:
                with open(limit) as f:
                    raw = f.read().strip()
                with open(usage) as f:
                    used = int(f.read().strip())
            except (OSError, ValueError):
                continue
            if raw.isdigit() and int(raw) < 2**60:
                out.append(max(0, int(raw) - used) / 2**20)
    return out


def available_mib() -> float | None:
    """Memory this process can still take, MiB: the kernel's MemAvailable, lowered to what its memory cgroup
    leaves and to the free address space under RLIMIT_AS. None where none of these can be read (off Linux)."""
    found: list[float] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) / 1024)
    except OSError:
        pass
    found += _cgroup_limits()
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as f:
                size = int(f.read().split()[0]) * _PAGE_MIB
            found.append(max(0.0, soft / 2**20 - size))
        except (OSError, ValueError, IndexError):
            pass
    return min(found) if found else None
