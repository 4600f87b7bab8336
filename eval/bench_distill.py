"""Distillation benchmark on the bundled SmolLM2-135M: what the distill stage wins back after one-shot
compression, within a fixed wall-clock budget of training per row on this CPU.

Rows (each: the one-shot recipe alone = "before", then the same recipe followed by a distill stage =
"after"; both in their own process, so peak RSS is each run's own):

* SparseGPT 2:4, SparseGPT 50%: distillation with the masks kept exactly;
* GPTQ int3 g64, GPTQ q4_0: quantization-aware distillation on their own grids (fixed scales);
* SparseGPT 70% one-shot + distillation, against gradual 70% (SparseGPT 50%, then sparsity raised to
  70% during distillation on Zhu & Gupta's cubic schedule, Wanda scores), with the same budget.

Training windows: non-overlapping 512-token windows of the first half of the WikiText-2 validation text
(``#0:0.5``, the calibration half; its last 4 windows held out); the teacher (the dense model) is cached
once as top-64 logits and shared by every row (its seconds are reported on the first row that pays them).
Evaluation: 2048-token windows of the second half, perplexity (GPTQ protocol) and KL against the same
cached dense logits. "gap recovered" = (log ppl_before − log ppl_after) / (log ppl_before − log ppl_dense).
Writes eval/results/distill.md, .json and .png (per row, during training: the held-out top-64 bucket KL
bound, a lower bound of the KL; the evaluation's KL columns are full-vocabulary).

    python eval/bench_distill.py [--minutes 30] [--rows sparsegpt-2of4,gptq-q4_0] [--windows 8]
    python eval/bench_distill.py --minutes 1 --max-tokens 8192 --rows sparsegpt-2of4 --windows 2 --out /tmp/d
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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

CAL = {"data": "wikitext2", "samples": 32, "seq_len": 512, "seed": 0}  # --calib overrides the data
W3G64 = {"stage": "gptq", "format": "int", "bits": 3, "group_size": 64, "symmetric": True}
Q4_0 = {"stage": "gptq", "format": "q4_0"}


def sgpt(**kw) -> dict:
    return {"stage": "sparsegpt", **kw}


def distill(**kw) -> dict:
    """The shipped configs' distill entry (sparsegpt-2of4-distill.yaml), budget set per run."""
    base = dict(stage="distill", loss="forward_kl", top_k=64, seq_len=512, batch_size=1, grad_accum=4)
    base.update(gradient_checkpointing=False)
    base.update(lr=1e-4, warmup=0.05, decay="cosine", eval_every=10, heldout_windows=4)
    return {**base, **kw}


GRADUAL = {"target": 0.7, "start": 0.0, "end": 0.7, "updates": 10, "score": "wanda"}
# name: (label, one-shot stages, distill entry overrides)
ROWS = {
    "sparsegpt-2of4": ("SparseGPT 2:4", [sgpt(pattern="2:4")], {}),
    "sparsegpt-50": ("SparseGPT 50%", [sgpt(sparsity=0.5)], {}),
    "gptq-w3g64": ("GPTQ int3 g64 (QAT)", [W3G64], {"lr": 5e-5}),
    "gptq-q4_0": ("GPTQ q4_0 (QAT)", [Q4_0], {"lr": 1e-4}),  # 1e-4 beat 5e-5: distill-qat-lr1e-4.md
    "sparsegpt-70": ("SparseGPT 70% one-shot", [sgpt(sparsity=0.7)], {}),
    "gradual-70": ("gradual 50% → 70%", [sgpt(sparsity=0.5)], {"gradual": GRADUAL}),
}


def recipe(stages: list[dict]) -> dict:
    return {"calibration": CAL, "stages": stages}


def final_sparsity(report: dict) -> float | None:
    """The sparsity the saved model ends at: gradual distillation's if a distill stage raised it, else the
    last pruning stage's (None without one)."""
    for d in reversed(list(report.get("model_stages", {}).values())):
        if d.get("gradual_sparsity") is not None:
            return d["gradual_sparsity"]
    return next((s["sparsity"] for s in reversed(list(report["stages"].values())) if "sparsity" in s), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0, help="training wall clock per row (max_minutes)")
    ap.add_argument("--max-tokens", type=int, default=1_000_000, help="token budget per row (max_tokens)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument(
        "--before-only",
        default="",
        help="comma-separated rows measured without their distill run (e.g. sparsegpt-70: the one-shot reference)",
    )
    ap.add_argument("--lr", type=float, default=None, help="learning rate for every row (default: each row's own)")
    ap.add_argument("--windows", type=int, default=8, help="2048-token evaluation windows")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--out", default=str(REPO / "eval" / "results" / "distill"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    require_text()
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")

    from llmopt.backends.torch_backend import TorchBackend

    dense = CachedBackend(TorchBackend.from_spec(MODEL))
    dense_r = evaluate_folder(dense, None, args.seq_len, args.windows)
    print(f"dense: ppl {dense_r.perplexity:.3f}", flush=True)
    records, rows = [], []
    work = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    try:
        for name in names:
            label, stages, over = ROWS[name]
            entry = distill(max_minutes=args.minutes, max_tokens=args.max_tokens, **over)
            if args.lr is not None:
                entry["lr"] = args.lr
            rep0 = run_compress(recipe(stages), work / f"{name}-0")
            r0 = evaluate_folder(str(work / f"{name}-0"), dense, args.seq_len, args.windows)
            cleanup(work / f"{name}-0")
            if name in args.before_only.split(","):
                rec = dict(
                    row=name,
                    label=label,
                    ppl_before=r0.perplexity,
                    kl_before=r0.kl.mean,
                    final_sparsity=final_sparsity(rep0),
                )
                rec.update(compress_seconds_before=rep0["total_seconds"], peak_rss_mib_before=rep0["peak_rss_mib"])
                records.append(rec)
                rows.append([label + " (no distillation)", fmt(r0.perplexity, 2), "", "", "", fmt(r0.kl.mean, 4)])
                rows[-1] += ["", "", "", fmt(rep0["total_seconds"] / 60, 1), fmt(rep0["peak_rss_mib"] / 1024, 2)]
                print(rows[-1], flush=True)
                _write(args, dense_r, records, rows)
                continue
            t0 = time.perf_counter()
            rep1 = run_compress(recipe([*stages, entry]), work / name)
            wall = time.perf_counter() - t0
            r1 = evaluate_folder(str(work / name), dense, args.seq_len, args.windows)
            d = next(iter(rep1["model_stages"].values()))
            curve = json.loads((work / name / "distill_curve.json").read_text())
            cleanup(work / name)
            gap = math.log(r0.perplexity) - math.log(dense_r.perplexity)
            recovered = (math.log(r0.perplexity) - math.log(r1.perplexity)) / gap if gap > 0 else float("nan")
            rec = dict(
                row=name,
                label=label,
                ppl_before=r0.perplexity,
                ppl_after=r1.perplexity,
                ppl_ratio_after=r1.perplexity / dense_r.perplexity,
                gap_recovered=recovered,
                kl_before=r0.kl.mean,
                kl_after=r1.kl.mean,
                tokens=d["tokens"],
                steps=d["steps"],
                train_minutes=d["minutes"],
                stopped_by=d["stopped_by"],
                teacher_seconds=d["teacher_seconds"],
                teacher_windows_computed=d["teacher_windows_computed"],
                compress_seconds_before=rep0["total_seconds"],
                total_minutes=round(wall / 60, 2),
                peak_rss_mib=rep1["peak_rss_mib"],
                peak_rss_mib_before=rep0["peak_rss_mib"],
                final_sparsity=final_sparsity(rep1),
                heldout_kl_topk_bound_before=d["heldout_before"]["kl_topk_bound"],
                heldout_kl_topk_bound_after=d["heldout_after"]["kl_topk_bound"],
                curve=curve,
            )
            records.append(rec)
            rows.append(
                [
                    label,
                    fmt(r0.perplexity, 2),
                    fmt(r1.perplexity, 2),
                    fmt(rec["ppl_ratio_after"], 3) + "x",
                    f"{100 * recovered:.0f}%",
                    fmt(r0.kl.mean, 4),
                    fmt(r1.kl.mean, 4),
                    f"{d['tokens']:,}",
                    fmt(d["minutes"], 1),
                    fmt(wall / 60, 1),
                    fmt(rep1["peak_rss_mib"] / 1024, 2),
                ]
            )
            print(rows[-1], flush=True)
            _write(args, dense_r, records, rows)  # a partial run keeps what it has
    finally:
        cleanup(work)
    _write(args, dense_r, records, rows)


def _write(args, dense_r, records: list[dict], rows: list[list[str]]) -> None:
    header = [
        "row",
        "ppl before",
        "ppl after",
        "after / dense",
        "gap recovered",
        "KL before",
        "KL after",
        "tokens trained",
        "train min",
        "total min",
        "peak RSS GiB",
    ]
    md = [
        "# Distillation: SmolLM2-135M-Instruct (bundled), WikiText-2",
        "",
        f"Dense perplexity **{dense_r.perplexity:.3f}** on {dense_r.windows} windows x {args.seq_len} tokens of the "
        "second half of `valid.nounk.txt`. Training: 512-token windows of the first half (teacher = the dense "
        f"model, top-64 logits cached once), budget **{args.minutes:g} min** or {args.max_tokens:,} tokens per row, "
        "whichever comes first (forward KL, AdamW lr "
        + (f"{args.lr:g}" if args.lr is not None else "1e-4, 5e-5 for QAT")
        + ", cosine, 2048 tokens per step).",
        "`gap recovered` = share of the log-perplexity gap to dense that distillation closed. `train min` = the "
        "training loop (steps, held-out losses, checkpoints); `total min` = the whole `llmopt compress` with "
        "distillation (one-shot stages, teacher cache on the first row, saving); peak RSS of that process.",
        "",
        markdown_table(header, rows),
        "",
        f"Machine: {machine_note()}. Produced by `python eval/bench_distill.py --minutes {args.minutes:g} "
        f"--rows {args.rows}"
        + (f" --lr {args.lr:g}" if args.lr is not None else "")
        + (f" --before-only {args.before_only}`." if args.before_only else "`."),
    ]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"dense_ppl": dense_r.perplexity, "rows": records}, indent=1))
    _plot(records, Path(args.out + ".png"))


def _plot(records: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=110)
    ax = fig.subplots()
    for r in records:
        if "curve" not in r:
            continue
        held = r["curve"]["heldout"]
        ax.plot([h["tokens"] for h in held], [h["kl_topk_bound"] for h in held], "o-", ms=3, label=r["label"])
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("held-out KL bound (top-64 buckets, T=1)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
