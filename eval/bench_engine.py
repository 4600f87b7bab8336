"""Engine cost and dtype benchmark on the bundled SmolLM2-135M: peak RSS and seconds of the shipped
compression configs in float32 and bfloat16, with perplexity and KL of the result.

Every row is ``llmopt compress --dtype D`` in its own process (peak RSS = that process's VmHWM, the
model load and save included); calibration 32 x 512 tokens (seed 0) of the first half of
valid.nounk.txt, evaluation on 2048-token windows of the second half with KL against the same dense
logits. The "before" column is the same config's peak RSS from the results committed before the
engine kept only codes (not float32 weights) of quantized Linears (quant.json / pruning.json of
commit ce40368). Writes ``--out``.{md,json,png} (committed runs: eval/results/engine-float32.md,
engine-dtypes.md; engine.md says which is newer).

    python eval/bench_engine.py [--windows 4] [--configs gptq-q4_0,gptq-w4g64] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MODEL,
    REPO,
    CachedBackend,
    cleanup,
    evaluate_folder,
    fmt,
    machine_note,
    markdown_table,
    require_text,
    run_compress,
)

CONFIGS = ["gptq-q4_0", "gptq-w4g64", "gptq-w3g64", "sparsegpt-50"]
# Peak RSS (MiB) of the same configs (then float32 only) in eval/results/{quant,pruning}.json at commit
# ce40368, before this engine change.
BEFORE_MIB = {"gptq-q4_0": 1.93 * 1024, "gptq-w4g64": 1.92 * 1024, "gptq-w3g64": 1.91 * 1024, "sparsegpt-50": 1341.0}


def _before_from_git() -> dict[str, float]:
    """Peak RSS per config from the committed results of ce40368 when git has them, else BEFORE_MIB."""
    import subprocess

    out = dict(BEFORE_MIB)
    try:
        quant = json.loads(subprocess.check_output(["git", "show", "ce40368:eval/results/quant.json"], cwd=REPO))
        prune = json.loads(subprocess.check_output(["git", "show", "ce40368:eval/results/pruning.json"], cwd=REPO))
    except (subprocess.CalledProcessError, OSError, ValueError):
        return out
    for r in quant.get("rows", []):
        if r.get("method") != "GPTQ":
            continue
        key = {"int4 g64 sym": "gptq-w4g64", "int3 g64 sym": "gptq-w3g64", "q4_0": "gptq-q4_0"}.get(r.get("scheme"))
        if key and "peak_rss_mib" in r:
            out[key] = r["peak_rss_mib"]
    for r in prune.get("rows", []):
        if r.get("method") == "sparsegpt" and r.get("pattern") == "50%":
            out["sparsegpt-50"] = r["peak_rss_mib"]
    return out


def _plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in records))
    dtypes = list(dict.fromkeys(r["dtype"] for r in records))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / (len(dtypes) + 1)
    for ax, key, label in ((axes[0], "peak_rss_mib", "peak RSS (MiB)"), (axes[1], "compress_seconds", "seconds")):
        for k, dt in enumerate(dtypes):
            ys = [next((r[key] for r in records if r["config"] == c and r["dtype"] == dt), 0) for c in configs]
            ax.bar([i + k * width for i in range(len(configs))], ys, width, label=dt)
        if key == "peak_rss_mib":
            ys = [records[0]["before"].get(c, 0) for c in configs]
            ax.bar([i + len(dtypes) * width for i in range(len(configs))], ys, width, label="float32, before")
            ax.axhline(1.2 * 1024, color="k", ls="--", lw=0.8, label="1.2 GiB goal (gptq-q4_0)")
        ax.set_xticks([i + width * len(dtypes) / 2 for i in range(len(configs))], configs, rotation=15)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0].set_title("peak RSS of llmopt compress (whole process)")
    axes[1].set_title("engine seconds (calibration + kernels)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4, help="2048-token evaluation windows")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--quick", action="store_true", help="1 window, 8x256 calibration: a smoke run")
    ap.add_argument("--out", default=str(REPO / "eval" / "results" / "engine"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    require_text()
    windows = 1 if args.quick else args.windows
    before = _before_from_git()

    from llmopt.backends.torch_backend import TorchBackend

    dense = CachedBackend(TorchBackend.from_spec(MODEL))
    dense_r = evaluate_folder(dense, None, args.seq_len, windows)
    print(f"dense: ppl {dense_r.perplexity:.3f}", flush=True)
    records, rows = [], []
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    try:
        for config in args.configs.split(","):
            for dtype in args.dtypes.split(","):
                out = work / f"{config}-{dtype}"
                extra = ["--dtype", dtype] + (["--calib-samples", "8", "--calib-seq-len", "256"] if args.quick else [])
                t0 = time.perf_counter()
                rep = run_compress(str(REPO / "configs" / f"{config}.yaml"), out, extra)
                wall = time.perf_counter() - t0
                r = evaluate_folder(str(out), dense, args.seq_len, windows)
                rec = dict(
                    config=config,
                    dtype=dtype,
                    ppl=r.perplexity,
                    kl_mean=r.kl.mean,
                    top1=r.kl.top1_agreement,
                    compress_seconds=rep["compress_seconds"],
                    total_seconds=rep["total_seconds"],
                    wall_seconds=round(wall, 1),
                    peak_rss_mib=rep["peak_rss_mib"],
                    folder_mib=round(sum(f.stat().st_size for f in out.iterdir()) / 2**20, 1),
                    before=before,
                )
                records.append(rec)
                b = before.get(config)
                rows.append(
                    [
                        config,
                        dtype,
                        fmt(r.perplexity, 3),
                        fmt(r.kl.mean, 4),
                        fmt(rep["compress_seconds"], 1),
                        fmt(rep["total_seconds"], 1),
                        fmt(rep["peak_rss_mib"] / 1024, 2),
                        "" if b is None or dtype != "float32" else fmt(b / 1024, 2),
                        fmt(rec["folder_mib"], 0),
                    ]
                )
                print(rows[-1], flush=True)
                cleanup(out)
    finally:
        cleanup(work)
    header = [
        "config",
        "dtype",
        "ppl",
        "KL vs dense",
        "engine s",
        "total s",
        "peak RSS GiB",
        "peak RSS GiB before",
        "folder MiB",
    ]
    md = [
        "# Engine cost: SmolLM2-135M-Instruct (bundled), float32 vs bfloat16",
        "",
        f"Dense perplexity **{dense_r.perplexity:.3f}** on {dense_r.windows} windows x {args.seq_len} tokens of the "
        "second half of `valid.nounk.txt`; calibration 32 x 512 tokens, seed 0, first half"
        + (" (QUICK RUN: 8 x 256)" if args.quick else "")
        + ". `engine s`: calibration engine + kernels; `total s`: the whole `llmopt compress` (load, calibration "
        "sampling, engine, save); peak RSS: VmHWM of that process. `--dtype bfloat16` loads, calibrates and saves "
        "in bfloat16 (kernels compute in float32; quantized Linears are saved in float32, where code x scale is "
        "exact). `before`: float32 peak RSS committed before the engine stopped keeping a float32 copy of every "
        "quantized weight.",
        "",
        markdown_table(header, rows),
        "",
        f"Machine: {machine_note()}. Produced by `python eval/bench_engine.py`.",
    ]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"dense_ppl": dense_r.perplexity, "rows": records}, indent=1))
    _plot(records, Path(args.out + ".png"))
    print("\n".join(md))


if __name__ == "__main__":
    main()
