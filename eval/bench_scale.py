"""How ``llmopt compress`` scales with model size, in memory and streamed (``--low-memory``): seconds and peak
RSS of gptq-q4_0 on randomly initialised Llama-architecture models of growing size, the slope of each
against the parameter count, and a streamed run under a memory cap smaller than the model's float32 size
that succeeds where the in-memory run is killed.

Models (random, std 0.02, norms at 1, tied embedding, SmolLM2's 49152-token vocabulary and tokenizer copied
from the embedded model's converted folder), written layer by layer as safetensors shards (one per decoder
layer: no size is ever built whole in memory) into a temporary folder:

    135m  hidden 576,  30 layers, MLP 1536, 9 heads / 3 KV   (SmolLM2-135M's shape)
    360m  hidden 960,  32 layers, MLP 2560, 15 heads / 5 KV  (SmolLM2-360M's shape)
    1.7b  hidden 2048, 24 layers, MLP 8192, 32 heads / 32 KV (SmolLM2-1.7B's shape)

Every compression is ``python -m llmopt.cli compress`` in its own process (``--no-low-memory`` or
``--low-memory``); its peak RSS is that child's ``ru_maxrss`` (``os.wait4``), its seconds the wall clock.
Calibration: 32 x 512 tokens of the first half of WikiText-2's validation text (``eval/common.py`` CALIB).

The memory cap (``--cap``): a memory cgroup made for the child (cgroup v1 ``memory.limit_in_bytes`` or v2
``memory.max``, under this process's own cgroup; removed afterwards), else ``RLIMIT_AS`` (address space, which
counts the memory-mapped shards and the libraries too: a far cruder cap). A cgroup is charged the child's own
memory and the page cache it brings in first: the model's shards are evicted from the page cache before each
capped run (so reading them counts), the shared libraries are not (already charged elsewhere). The cap is
``--cap-fraction`` of the model's float32 size; ``--cap-over-baseline`` adds what an idle process that imported
torch, transformers and llmopt is charged (for the small sizes, whose float32 size is below that baseline).
The parent never imports torch (a child's ``ru_maxrss`` starts at its parent's size at fork): models are made
and outputs compared in children of their own.

    python eval/bench_scale.py                       # every size, both modes, the cap on the largest (hours)
    python eval/bench_scale.py --sizes 135m --samples 4 --seq-len 128 --cap --cap-over-baseline --check --out /tmp/scale
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The parent process never imports torch (eval/common.py does, so it is imported only to write the results): a
# child's ru_maxrss starts from its parent's resident size at fork, so a big parent would inflate every row.
REPO = Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.nounk.txt"
CALIB = f"text:{TEXT}#0:0.5"  # eval/common.py's CALIB: the first half of the WikiText-2 validation text

SHAPES = {
    "135m": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, heads=9, kv=3),
    "360m": dict(hidden_size=960, num_hidden_layers=32, intermediate_size=2560, heads=15, kv=5),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=24, intermediate_size=8192, heads=32, kv=32),
}
VOCAB = 49152


def make_model(size: str, folder: Path, seed: int = 0) -> int:
    """A random Llama of shape ``size`` saved in ``folder`` shard by shard; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations.accelerate import init_empty_weights

    from llmopt.models import resolve_local_folder
    from llmopt.safetensors_io import ShardWriter

    s = dict(SHAPES[size])
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        num_attention_heads=s.pop("heads"),
        num_key_value_heads=s.pop("kv"),
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
        **s,
    )
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    src = Path(resolve_local_folder("bundled:smollm2"))  # the 49152-token tokenizer
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).exists():
            shutil.copy(src / f, folder / f)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(cfg)
    names = {n: tuple(p.shape) for n, p in skeleton.state_dict().items() if n != "lm_head.weight"}  # tied
    gen = torch.Generator().manual_seed(seed)
    groups = [[n for n in names if not n.startswith("model.layers.")]]
    groups += [[n for n in names if n.startswith(f"model.layers.{i}.")] for i in range(cfg.num_hidden_layers)]
    writer = ShardWriter(folder, len(groups))
    for k, group in enumerate(groups):
        tensors = {}
        for n in group:
            shape = names[n]
            tensors[n] = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        writer.write(k, tensors)
    total = sum(math.prod(s) for s in names.values())
    writer.finish(total)
    return total


class MemoryCap:
    """A memory cgroup for one child process (v1 or v2, under this process's own), or None where none can be made."""

    def __init__(self, limit_bytes: int):
        self.limit, self.path, self.kind = limit_bytes, None, None
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, own = line.split(":", 2)
            if "memory" in controllers.split(","):
                base, self.kind = Path(f"/sys/fs/cgroup/memory{own}"), "v1"
            elif controllers == "" and Path(f"/sys/fs/cgroup{own}/memory.max").exists():
                base, self.kind = Path(f"/sys/fs/cgroup{own}"), "v2"
            else:
                continue
            path = base / f"llmopt-bench-{os.getpid()}"
            try:
                path.mkdir()
                limit = "memory.limit_in_bytes" if self.kind == "v1" else "memory.max"
                (path / limit).write_text(str(limit_bytes))
                self.path = path
                return
            except OSError:
                if path.exists():
                    path.rmdir()
                self.kind = None

    def preexec(self):
        path, limit = self.path, self.limit

        def enter():
            if path is not None:
                (path / "cgroup.procs").write_text(str(os.getpid()))
            else:  # no cgroup: cap the address space
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        return enter

    def peak_mib(self) -> float | None:
        """The most memory the cgroup was charged (v1 ``memory.max_usage_in_bytes``, v2 ``memory.peak``)."""
        if self.path is None:
            return None
        f = self.path / ("memory.max_usage_in_bytes" if self.kind == "v1" else "memory.peak")
        try:
            return int(f.read_text().split()[0]) / 2**20
        except (OSError, ValueError, IndexError):
            return None

    @property
    def how(self) -> str:
        return f"cgroup {self.kind}" if self.path is not None else "RLIMIT_AS"

    def close(self) -> None:
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError:
                pass


def drop_page_cache(folder: Path) -> None:
    """Evict the folder's files from the page cache (written, so clean once synced), so that a capped child's
    reads of the model are charged to its own cgroup rather than to whoever wrote or read them first."""
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child(*args: str) -> str:
    """This script in a child process (``--make`` / ``--compare``): its last line of output."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def run(
    folder: Path, out: Path, low_memory: bool, samples: int, seq_len: int, cap: MemoryCap | None = None, procs: int = 1
) -> dict:
    """One ``llmopt compress`` in a child process (under ``torchrun`` with ``procs`` > 1): seconds, peak RSS
    (ru_maxrss of that child and its descendants: the largest single process), exit status."""
    cmd = [sys.executable, "-m", "llmopt.cli"]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "-m", "llmopt.cli"]
    cmd += ["compress", str(folder), "--recipe", "gptq-q4_0"]
    cmd += ["--output", str(out), "--overwrite", "--calib", CALIB, "--calib-samples", str(samples)]
    cmd += ["--calib-seq-len", str(seq_len), "--low-memory" if low_memory else "--no-low-memory"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, preexec_fn=cap.preexec() if cap else None
    )
    err = p.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    row = {
        "mode": ("streamed" if low_memory else "in memory") + (f", {procs} processes" if procs > 1 else ""),
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "exit": p.returncode,
    }
    if cap is not None and cap.peak_mib() is not None:
        row["cgroup_peak_mib"] = round(cap.peak_mib(), 1)
    if p.returncode == 0:
        report = json.loads((out / "llmopt_report.json").read_text())
        row.update(compress_seconds=report["compress_seconds"], low_memory=report.get("low_memory", False))
        row["peak_rss_mib_by_phase"] = report.get("peak_rss_mib_by_phase", {})
    else:
        row["error"] = (err.strip().splitlines() or ["killed"])[-1][-300:]
    return row


def differing(a: Path, b: Path) -> float:
    """The fraction of values (weights, codes, scales) of the two output folders that differ: 0.0 when every
    tensor is equal bit for bit with the same names and dtypes, 1.0 when the names or dtypes differ."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict:
        out = {}
        for p in sorted(folder.glob("*.safetensors")):
            with safe_open(str(p), framework="pt") as f:
                out.update({(p.name == "quantization.safetensors", k): f.get_tensor(k) for k in f.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    if sorted(ta) != sorted(tb) or any(ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape for k in ta):
        return 1.0
    return sum(int((ta[k] != tb[k]).sum()) for k in ta) / sum(ta[k].numel() for k in ta)


def baseline_mib() -> float:
    """What a process that only imports what a compression imports (torch, transformers, llmopt) is charged, MiB:
    its cgroup's peak where a cgroup can be made, else its ru_maxrss."""
    code = "import llmopt.compression, llmopt.models, transformers, torch"
    cap = MemoryCap(1 << 40)
    try:
        p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                             preexec_fn=cap.preexec() if cap.path is not None else None)  # fmt: skip
        _, _, usage = os.wait4(p.pid, 0)
        return cap.peak_mib() or usage.ru_maxrss / 1024
    finally:
        cap.close()


def fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares line y = a + b·x, or None with fewer than two points."""
    if len(xs) < 2:
        return None
    import numpy as np

    b, a = np.polyfit(xs, ys, 1)
    return float(a), float(b)


def plot(rows: list[dict], fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, color in (("in memory", "tab:red"), ("streamed", "tab:blue"), ("in memory, 2 processes", "tab:green")):
        rs = [r for r in rows if r["mode"] == mode and r["exit"] == 0 and not r.get("capped")]
        xs = [r["params"] / 1e6 for r in rs]
        axes[0].plot(xs, [r["peak_rss_mib"] / 1024 for r in rs], "o-", color=color, label=mode)
        axes[1].plot(xs, [r["seconds"] for r in rs], "o-", color=color, label=mode)
    sizes = sorted({r["params"] for r in rows})
    axes[0].plot([p / 1e6 for p in sizes], [4 * p / 2**30 for p in sizes], "k--", label="float32 weights")
    axes[0].set(xlabel="parameters (M)", ylabel="peak RSS (GiB)", title="gptq-q4_0: peak memory")
    axes[1].set(xlabel="parameters (M)", ylabel="seconds", title="gptq-q4_0: wall time")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--make":  # child: write a model, print its parameter count
        print(make_model(sys.argv[2], Path(sys.argv[3])))
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--compare":  # child: are two outputs identical
        print(differing(Path(sys.argv[2]), Path(sys.argv[3])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--cap", action="store_true", help="also run both modes of the largest size under a memory cap")
    ap.add_argument("--cap-modes", default="in memory,streamed", help="which modes --cap runs")
    ap.add_argument("--cap-fraction", type=float, default=0.6, help="the cap as a fraction of the float32 size")
    ap.add_argument("--cap-over-baseline", action="store_true", help="add an idle torch process's RSS to the cap")
    ap.add_argument("--check", action="store_true", help="compare the two modes' outputs tensor by tensor")
    ap.add_argument(
        "--procs-sizes", default="135m,360m", help="sizes also run in memory by 2 torchrun processes ('' for none)"
    )
    ap.add_argument("--out", default=str(REPO / "eval" / "results" / "scale"), help="writes OUT.{md,json,png}")
    ap.add_argument("--modes", default="in memory,streamed", help="uncapped runs: 'in memory', 'streamed' or both")
    ap.add_argument("--model-dir", default=None, help="an already made model of the (single) size in --sizes")
    ap.add_argument(
        "--merge", default=None, help="a results .json whose rows this run keeps (rows it measures again replaced)"
    )
    a = ap.parse_args()
    if not TEXT.is_file():
        sys.exit(f"benchmark needs {TEXT} (see ../shared/data/README.md); not found")
    sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown size(s) {unknown}; known: {', '.join(SHAPES)}")
    rows: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="llmopt-scale-"))
    try:
        for size in sizes:
            folder = work / size
            if a.model_dir:
                folder = Path(a.model_dir)
                index = json.loads((folder / "model.safetensors.index.json").read_text())
                params = index["metadata"]["total_parameters"]
            else:
                params = int(child("--make", size, str(folder)))
            modes = [m.strip() for m in a.modes.split(",")]
            for low in (False, True):
                if ("streamed" if low else "in memory") not in modes:
                    continue
                r = run(folder, work / f"{size}-{low}", low, a.samples, a.seq_len)
                rows.append({"size": size, "params": params, **r})
                print(json.dumps(rows[-1]), flush=True)
            if a.check and len(modes) == 2 and rows[-1]["exit"] == 0 and rows[-2]["exit"] == 0:
                d = float(child("--compare", str(work / f"{size}-False"), str(work / f"{size}-True")))
                rows[-1]["differing_from_in_memory"] = d
                print(f"{size}: fraction of streamed output values differing from the in-memory run's: {d:.2e}")
            if size in [s.strip() for s in a.procs_sizes.split(",")]:
                r = run(folder, work / f"{size}-procs", False, a.samples, a.seq_len, procs=2)
                rows.append({"size": size, "params": params, **r})
                if a.check and r["exit"] == 0 and rows[-3]["exit"] == 0:
                    d = child("--compare", str(work / f"{size}-False"), str(work / f"{size}-procs"))
                    rows[-1]["differing_from_in_memory"] = float(d)
                print(json.dumps(rows[-1]), flush=True)
            for tail in ("False", "True", "procs"):
                shutil.rmtree(work / f"{size}-{tail}", ignore_errors=True)
            if a.cap and size == sizes[-1]:
                base = baseline_mib() if a.cap_over_baseline else 0.0
                limit = int(a.cap_fraction * 4 * params + base * 2**20)
                for low in (False, True):
                    if ("streamed" if low else "in memory") not in [m.strip() for m in a.cap_modes.split(",")]:
                        continue
                    drop_page_cache(folder)
                    cap = MemoryCap(limit)
                    try:
                        r = run(folder, work / f"{size}-cap", low, a.samples, a.seq_len, cap)
                    finally:
                        cap.close()
                    r.update(capped=True, cap_mib=round(limit / 2**20, 1), cap_how=cap.how, baseline_mib=round(base, 1))
                    rows.append({"size": size, "params": params, **r})
                    print(json.dumps(rows[-1]), flush=True)
                    shutil.rmtree(work / f"{size}-cap", ignore_errors=True)
            if not a.model_dir:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    for r in rows:
        r["commit"] = commit.stdout.strip()
    if a.merge:
        key = lambda r: (r["size"], r["mode"], bool(r.get("capped")))  # noqa: E731
        new = {key(r) for r in rows}
        rows = [r for r in json.loads(Path(a.merge).read_text())["rows"] if key(r) not in new] + rows
        order = {s: k for k, s in enumerate(SHAPES)}
        rows.sort(key=lambda r: (order[r["size"]], bool(r.get("capped"))))
    fits = {}
    for mode in ("in memory", "streamed"):
        rs = [r for r in rows if r["mode"] == mode and r["exit"] == 0 and not r.get("capped")]
        xs = [r["params"] / 1e6 for r in rs]
        fits[mode] = {"rss": fit(xs, [r["peak_rss_mib"] for r in rs]), "seconds": fit(xs, [r["seconds"] for r in rs])}
    write(rows, fits, a, Path(a.out))


def write(rows: list[dict], fits: dict, a, out: Path) -> None:
    from common import machine_note, markdown_table  # imports torch: only now, every run done

    out.parent.mkdir(parents=True, exist_ok=True)
    table = []
    for r in rows:
        cap = f"{r['cap_mib']:.0f} MiB ({r['cap_how']})" if r.get("capped") else "-"
        if r.get("cgroup_peak_mib") is not None:
            cap += f", charged {r['cgroup_peak_mib']:.0f}"
        status = "ok" if r["exit"] == 0 else f"failed ({r['exit']}): {r.get('error', '')[:80]}"
        if "differing_from_in_memory" in r:
            d = r["differing_from_in_memory"]
            status += ", output identical" if d == 0 else f", {100 * d:.2f}% of output values differ"
        if r.get("commit"):
            status += f" [{r['commit']}]"
        f32 = 4 * r["params"] / 2**20
        table.append(
            [r["size"], f"{r['params'] / 1e6:.1f}", f"{f32:.0f}", r["mode"], cap, f"{r['seconds']:.1f}",
             f"{r['peak_rss_mib']:.0f}", status]
        )  # fmt: skip
    header = ["size", "params (M)", "float32 (MiB)", "mode", "cap", "seconds", "peak RSS (MiB)", "result"]
    lines = [
        "# gptq-q4_0 in memory and streamed (`--low-memory`) by model size",
        "",
        f"Random Llama-shaped models, calibration {a.samples} x {a.seq_len} tokens; {machine_note()}.",
        "The 2-process rows run under torchrun, which gives each process one thread (OMP_NUM_THREADS=1), against",
        "the 1-process rows' threads: float32 matmuls blocked for another thread count differ in the last bits and",
        "GPTQ's column walk and the layer-by-layer calibration carry that into some codes. At equal threads per",
        "process 2 processes store the 1-process output bit for bit (tests/test_parallel.py).",
        "Command: `python eval/bench_scale.py " + " ".join(sys.argv[1:]) + "`",
        "",
        markdown_table(header, table),
        "",
        "Fitted lines (y = a + b x, x in millions of parameters):",
        "",
    ]
    for mode, f in fits.items():
        for what, unit in (("rss", "MiB"), ("seconds", "s")):
            if f[what] is not None:
                lines.append(f"- {mode}, {what}: a = {f[what][0]:.1f} {unit}, b = {f[what][1]:.3f} {unit} per M params")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "fits": fits}, indent=1))
    plot(rows, fits, out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
