"""Structured-pruning benchmark on the bundled SmolLM2-135M: smaller dense models, what distillation wins
back, and what they buy in llama.cpp speed.

Rows per shipped structured config (structured-mlp25, structured-depth20, minitron-75 = the structured
entry of minitron-75-distill, minitron-60 = that of minitron-60-distill-q4_0): the plain cut
(``reconstruct: false``, "plain cut"), the cut with its least-squares reconstruction (the shipped
default, "reconstructed cut"; both one-shot, no training), the cut + a distill stage with the shipped
distill settings and ``--minutes`` of training ("distill": the row's recipe's distill stage, minitron-75-distill's
for the rows whose recipe has none), and
that distilled folder + GPTQ q4_0 with the shipped gptq-q4_0 settings (= minitron-75-distill-q4_0's last
stage, on the same calibration windows), each exported to GGUF (F32 and q4_0, q8_0 token embedding as in
the dense files). References: the dense model as F32 GGUF and llama.cpp's own Q4_0 and Q4_K_M of it (no
imatrix). Every file runs in llama.cpp on the same windows (second half of WikiText-2 valid, 2048-token
windows), KL against the dense F32 GGUF; speed: 512-token prompt, 128 greedy tokens.
Writes eval/results/structured.md, .json and .png (perplexity vs decode tok/s).

    python eval/bench_structured.py [--minutes 30] [--rows mlp25,depth20,minitron-75,minitron-60] [--windows 8]
    python eval/bench_structured.py --minutes 1 --max-tokens 4096 --rows minitron-75 --windows 2 --out /tmp/s
    python eval/bench_structured.py --phases plain,cut --rows minitron-75,minitron-60   # one-shot rows only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    EVAL,
    MODEL,
    REPO,
    CachedBackend,
    alternating_speed,
    cleanup,
    fmt,
    machine_note,
    markdown_table,
    out_flag,
    require_text,
    round_medians,
    run_compress,
    shipped_calibration,
)

EMB = "q8_0"


def _shipped(recipe: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / "configs" / f"{recipe}.yaml").read_text())


def shipped_stage(recipe: str, kind: str, default: str | None = None) -> dict:
    """The first ``kind`` stage of a shipped recipe, as the YAML says it (so the benchmark runs the configs);
    that of recipe ``default`` where ``recipe`` has none."""
    raw = _shipped(recipe)
    found = next((s for s in raw["stages"] if s["stage"] == kind), None)
    if found is None and default is not None:
        return shipped_stage(default, kind)
    if found is None:
        raise KeyError(f"configs/{recipe}.yaml has no {kind} stage")
    return found


ROWS = {
    "mlp25": ("MLP -25%", "structured-mlp25"),
    "depth20": ("depth -20%", "structured-depth20"),
    "minitron-75": ("Minitron 75% (MLP + depth)", "minitron-75-distill"),
    "minitron-60": ("Minitron 60% (MLP + depth)", "minitron-60-distill-q4_0"),
}
PHASES = {"plain": "plain cut", "cut": "reconstructed cut", "distill": "reconstructed cut + distill"}


def gguf_eval(path: Path, base, args) -> dict:
    from llmopt.evaluation import evaluate

    r = evaluate(
        str(path),
        data=EVAL,
        seq_len=args.seq_len,
        max_windows=args.windows,
        base=base,
        speed=args.speed_rounds == 0,  # else every file is timed in the alternating rounds at the end
        threads=args.threads,
        progress=False,
    )
    return dict(
        ppl=r.perplexity,
        kl=r.kl.mean if r.kl is not None else 0.0,
        top1=r.kl.top1_agreement if r.kl is not None else 1.0,
        mib=path.stat().st_size / 2**20,
        prefill=r.speed.prefill_tok_s if r.speed else None,
        decode=r.speed.decode_tok_s if r.speed else None,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0, help="distillation wall clock per row")
    ap.add_argument("--max-tokens", type=int, default=1_000_000)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--phases", default=",".join(PHASES), help="plain (cut, no reconstruction), cut, distill")
    ap.add_argument("--out", default=str(REPO / "eval" / "results" / "structured"))
    ap.add_argument(
        "--speed-rounds",
        type=int,
        default=5,
        help="re-time every file at the end in this many alternating rounds (the table's speed: medians); "
        "0: each file's own measurement when it was made",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    require_text()
    names = args.rows.split(",")
    if any(n not in ROWS for n in names):
        sys.exit(f"unknown rows; valid: {', '.join(ROWS)}")
    phases = args.phases.split(",")
    if any(p not in PHASES for p in phases):
        sys.exit(f"unknown phases; valid: {', '.join(PHASES)}")

    from llmopt.backends.llamacpp_backend import LlamaCppBackend
    from llmopt.exporters import export_gguf

    budget = {"max_minutes": args.minutes, "max_tokens": args.max_tokens}
    q4 = shipped_stage("gptq-q4_0", "gptq")
    work = Path(tempfile.mkdtemp(prefix="bench-structured-"))
    records: list[dict] = []
    files: dict[str, Path] = {}  # label → GGUF, kept for the alternating speed rounds at the end
    try:
        f32 = work / "dense-f32.gguf"
        export_gguf(MODEL, str(f32), type="f32")
        base = CachedBackend(LlamaCppBackend(str(f32), threads=args.threads))
        for label, how in (
            ("dense F32", "f32"),
            ("dense Q4_0 (llama.cpp)", "q4_0"),
            ("dense Q4_K_M (llama.cpp)", "q4_k_m"),
        ):
            path = f32 if how == "f32" else work / f"dense-{how}.gguf"
            if how != "f32":
                export_gguf(MODEL, str(path), type=how, embedding_type=EMB, threads=args.threads)
            records.append(
                dict(row="dense", label=label, fmt=how.upper(), params=134_515_008, **gguf_eval(path, base, args))
            )
            files[label] = path
            print(records[-1], flush=True)
        for name in names:
            label, recipe = ROWS[name]
            cut = shipped_stage(recipe, "structured")
            cal = shipped_calibration(recipe)  # its sizes; run_compress passes --calib (the text)
            # the row's own recipe's distill settings (minitron-75-distill's where the recipe has none)
            distill = shipped_stage(recipe, "distill", default="minitron-75-distill") | budget
            runs = {"plain": [cut | {"reconstruct": False}], "cut": [cut], "distill": [cut, distill]}
            for phase, stages in ((p, runs[p]) for p in PHASES if p in phases):
                folder = work / f"{name}-{phase}"
                rep = run_compress({"calibration": cal, "stages": stages}, folder)
                st = rep["model_stages"]["0:structured"]
                d = rep["model_stages"].get("1:distill", {})
                gg = work / f"{name}-{phase}-f32.gguf"
                export_gguf(str(folder), str(gg), type="f32")
                common = dict(
                    row=name,
                    phase=phase,
                    params=st["params_after"],
                    non_embedding_fraction=st["non_embedding_fraction"],
                    sizes=st["after"],
                    tokens=d.get("tokens"),
                    train_minutes=d.get("minutes"),
                    compress_seconds=rep["total_seconds"],
                    calibration=f"{cal['samples']} x {cal['seq_len']}",
                )
                records.append(
                    dict(label=f"{label}, {PHASES[phase]}", fmt="F32", **common, **gguf_eval(gg, base, args))
                )
                print(records[-1], flush=True)
                files[records[-1]["label"]] = gg
                if phase == "distill":  # + GPTQ q4_0 on the distilled model: minitron-75-distill-q4_0
                    qf = work / f"{name}-q4_0"
                    rq = run_compress({"calibration": cal, "stages": [q4]}, qf, model=str(folder))
                    gq = work / f"{name}-q4_0.gguf"
                    export_gguf(str(qf), str(gq), type="auto", embedding_type=EMB)
                    row = dict(
                        label=f"{label}, distilled + GPTQ q4_0", fmt="Q4_0", **common, **gguf_eval(gq, base, args)
                    )
                    row["compress_seconds"] += rq["total_seconds"]
                    records.append(row)
                    files[row["label"]] = gq
                    print(records[-1], flush=True)
                    cleanup(qf)
                cleanup(folder)
                write(args, records)
        if args.speed_rounds > 0:
            runs = alternating_speed(files, args.speed_rounds, args.threads)
            for r in records:
                r["prefill"], r["decode"], r["decode_range"] = round_medians(runs[r["label"]])
                r["speed_rounds"] = args.speed_rounds
    finally:
        cleanup(work)
    write(args, records)


def write(args, records: list[dict]) -> None:
    dense_q4 = next((r for r in records if r["label"].startswith("dense Q4_0")), None)
    dense_ppl = next((r["ppl"] for r in records if r["label"] == "dense F32"), None)
    header = [
        "model",
        "GGUF",
        "params M",
        "non-emb kept",
        "MiB",
        "ppl",
        "ppl / dense",
        "KL",
        "top-1",
        "prefill tok/s",
        "decode tok/s",
        "decode vs dense Q4_0",
        "trained tokens",
    ]
    rows = []
    for r in records:
        rows.append(
            [
                r["label"],
                r["fmt"],
                fmt(r["params"] / 1e6, 1),
                fmt(r.get("non_embedding_fraction", 1.0), 3),
                fmt(r["mib"], 1),
                fmt(r["ppl"], 2),
                fmt(r["ppl"] / dense_ppl, 3) + "x" if dense_ppl else "",
                fmt(r["kl"], 4),
                fmt(r["top1"], 3),
                fmt(r["prefill"], 0),
                fmt(r["decode"], 1),
                fmt(r["decode"] / dense_q4["decode"], 2) + "x" if dense_q4 and r["decode"] else "",
                f"{r['tokens']:,}" if r.get("tokens") else "",
            ]
        )
    md = [
        "# Structured pruning: SmolLM2-135M-Instruct (bundled), run by llama.cpp",
        "",
        f"{args.windows} windows x {args.seq_len} tokens of the second half of WikiText-2 `valid.nounk.txt`; KL "
        "against the dense F32 GGUF; calibration / training: the first half (calibration windows as each "
        "row's recipe says: "
        + ", ".join(sorted({f"{r['row']} {r['calibration']}" for r in records if "calibration" in r}))
        + "; "
        f"distillation: 512-token windows, shipped distill settings, budget {args.minutes:g} min or "
        f"{args.max_tokens:,} tokens). Speed: 512-token prompt, 128 greedy tokens, {args.threads} threads, "
        + (
            f"median of {args.speed_rounds} alternating rounds over all files at the end of the run"
            if args.speed_rounds > 0
            else "each file timed when it was made (median of 3)"
        )
        + f". Token embedding {EMB} in every quantized file.",
        "",
        markdown_table(header, rows),
        "",
        f"Machine: {machine_note()}. Produced by `python eval/bench_structured.py --minutes {args.minutes:g} "
        f"--rows {args.rows} --phases {args.phases} --speed-rounds {args.speed_rounds}"
        + out_flag(args.out, "structured")
        + "`.",
    ]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"rows": records}, indent=1))
    plot(records, Path(args.out + ".png"))


def plot(records: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=110)
    ax = fig.subplots()
    for r in (r for r in records if r["decode"]):  # untimed until the speed rounds at the end
        marker = "s" if r["row"] == "dense" else ("o" if r["fmt"] == "F32" else "D")
        ax.scatter(r["decode"], r["ppl"], marker=marker)
        ax.annotate(r["label"], (r["decode"], r["ppl"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("llama.cpp decode tokens/s")
    ax.set_ylabel("perplexity (WikiText-2 valid, 2nd half)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi + 0.45 * (hi - lo))  # room for the labels right of the points
    ax.set_title("perplexity vs llama.cpp decode speed (squares: dense, diamonds: q4_0)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")


if __name__ == "__main__":
    main()
