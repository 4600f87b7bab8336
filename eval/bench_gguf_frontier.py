"""GGUF frontier: llama.cpp's quantizer (plain and with an importance matrix) against llmopt's shipped GPTQ
recipes at every file type people download, each file as a whole with the tensor types llama.cpp chooses.

For the bundled SmolLM2-135M, per file type (Q4_0, Q4_K_S, Q4_K_M, IQ4_XS, Q5_K_M, Q6_K, Q3_K_M and the
shipped ``cpu-10x`` recipe): llama.cpp's own file without and with an imatrix (the imatrix from the same
calibration windows llmopt calibrates on: 32 x 512 tokens of the first half of WikiText-2 validation, seed
0), and llmopt's ``configs/gptq-<type>.yaml`` exported with ``--type auto`` (every tensor in llama.cpp's
type for that file type, codes written as GPTQ chose them). Every file is run by llama.cpp: perplexity, KL
against the F32 GGUF and top-1 agreement on the second half of WikiText-2 and on texts nothing calibrates on
(``--eval lee --eval newsgroups``: see eval/common.py), prefill and decode tokens/s; the torch F32 eager
speed in the same run gives the speed ratio. Writes eval/results/gguf-frontier.{md,json,png}.

    python eval/bench_gguf_frontier.py [--windows 8] [--types q4_k_m,iq4_xs] [--eval lee --eval newsgroups]

The verdict table says, per type, whether llmopt's file is no larger than llama.cpp's imatrix file (+1%)
and has lower perplexity and lower KL on every text. Run it alone on the machine: its speeds are timed.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CALIB,
    EVAL,
    MODEL,
    REPO,
    CachedBackend,
    alternating_speed,
    cleanup,
    describe_text,
    eval_texts,
    fmt,
    machine_note,
    markdown_table,
    out_flag,
    require_text,
    round_medians,
    run_compress,
    text_bench_args,
)

TYPES = ["q4_0", "q4_k_s", "q4_k_m", "iq4_xs", "q5_k_m", "q6_k", "q3_k_m"]
N_PARAMS = 134_515_008  # SmolLM2-135M parameters (embedding counted once: tied)
F32_BYTES = 4 * N_PARAMS


def recipe_for(ftype: str) -> Path:
    return REPO / "configs" / f"gptq-{ftype}.yaml"


def torch_speed(threads: int) -> dict:
    from llmopt.backends.torch_backend import TorchBackend
    from llmopt.data import evaluation_tokens
    from llmopt.metrics import measure_speed
    from llmopt.models import load_tokenizer

    be = TorchBackend.from_spec(MODEL, threads=threads)
    prompt = evaluation_tokens(EVAL, load_tokenizer(MODEL))[:512]
    s = measure_speed(be, prompt, 128)
    return {"prefill_tok_s": s.prefill_tok_s, "decode_tok_s": s.decode_tok_s, "threads": s.threads}


def main() -> None:
    ap = text_bench_args(
        __doc__.splitlines()[0], 8, "windows per text (F32 logits of each are cached)", "gguf-frontier"
    )
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated llama.cpp file types")
    ap.add_argument("--no-cpu10x", action="store_true", help="leave out the configs/cpu-10x.yaml row")
    ap.add_argument("--quick", action="store_true", help="2 windows of 512, 8x256 calibration: a smoke run")
    ap.add_argument(
        "--speed-rounds",
        type=int,
        default=3,
        help="time every file and torch F32 at the end in this many alternating rounds (the table's speeds: "
        "medians); 0: each file once when it is made, torch F32 after the last",
    )
    args = ap.parse_args()
    if args.plot_only:
        data = json.loads(Path(args.out + ".json").read_text())
        plot(data["rows"], data["texts"], args.out + ".png")
        return
    logging.basicConfig(level=logging.WARNING)
    require_text()
    extra = ["--calib-samples", "8", "--calib-seq-len", "256"] if args.quick else []
    windows, seq_len = (2, 512) if args.quick else (args.windows, args.seq_len)
    imatrix_n, imatrix_len = (8, 256) if args.quick else (32, 512)
    texts = {"wiki2-2nd-half": EVAL, **(eval_texts(args.eval) if args.eval else {})}

    from llmopt.backends.llamacpp_backend import LlamaCppBackend
    from llmopt.evaluation import evaluate
    from llmopt.exporters import export_gguf

    plan: list[tuple[str, str, str, object]] = [("F32", "llama.cpp F32", "dense", "f32")]
    for t in args.types.split(","):
        plan += [
            (t, f"llama.cpp {t.upper()}", "dense", None),
            (t, f"llama.cpp {t.upper()} + imatrix", "dense", CALIB),
            (t, f"llmopt gptq-{t}", "llmopt", recipe_for(t)),
        ]
    cpu10x = REPO / "configs" / "cpu-10x.yaml"
    if not args.no_cpu10x and cpu10x.is_file():
        plan.append(("cpu-10x", "llmopt cpu-10x", "llmopt", cpu10x))
    missing = [str(p[3]) for p in plan if p[2] == "llmopt" and not Path(p[3]).is_file()]
    if missing:
        sys.exit(f"recipes not found: {', '.join(missing)}")

    work = Path(tempfile.mkdtemp(prefix="bench-frontier-"))
    records = []
    files: dict[str, Path] = {}  # label → GGUF, kept for the alternating speed rounds at the end
    try:
        f32 = work / "f32.gguf"
        export_gguf(MODEL, str(f32), type="f32")
        base = CachedBackend(LlamaCppBackend(str(f32), threads=args.threads))
        for i_file, (ftype, label, source, how) in enumerate(plan):
            path, seconds = work / f"model-{i_file}.gguf", None
            t0 = time.perf_counter()
            if source == "dense" and ftype == "F32":
                path = f32
            elif source == "dense":
                export_gguf(MODEL, str(path), type=ftype, overwrite=True, imatrix=how, imatrix_samples=imatrix_n,
                            imatrix_seq_len=imatrix_len, threads=args.threads)  # fmt: skip
                seconds = time.perf_counter() - t0
            else:
                folder = work / "compressed"
                rep = run_compress(str(how), folder, extra)
                seconds = rep["compress_seconds"]
                export_gguf(str(folder), str(path), type="auto", overwrite=True)
                cleanup(folder)
            rec = {"type": ftype, "label": label, "file_mib": path.stat().st_size / 2**20, "quantize_s": seconds}
            rec["bpw"] = 8 * path.stat().st_size / N_PARAMS
            rec["smaller_than_f32"] = 1 - path.stat().st_size / F32_BYTES
            rec["texts"] = {}
            for i, (name, spec) in enumerate(texts.items()):
                timed = i == 0 and args.speed_rounds == 0  # else in the alternating rounds at the end
                r = evaluate(str(path), data=spec, seq_len=seq_len, max_windows=windows, base=base, speed=timed,
                             threads=args.threads, progress=False)  # fmt: skip
                rec["texts"][name] = {"ppl": r.perplexity, "ppl_stderr": r.perplexity_stderr, "kl": r.kl.mean,
                                      "top1": r.kl.top1_agreement, "windows": r.windows}  # fmt: skip
                if timed:
                    rec["prefill_tok_s"], rec["decode_tok_s"] = r.speed.prefill_tok_s, r.speed.decode_tok_s
            records.append(rec)
            print(json.dumps(rec), flush=True)
            Path(args.out + ".partial.json").write_text(json.dumps({"rows": records}, indent=1))
            if args.speed_rounds > 0:
                files[label] = path
            elif path != f32:
                path.unlink(missing_ok=True)
        ts = timed_rounds(records, files, args) if args.speed_rounds > 0 else torch_speed(args.threads)
    finally:
        cleanup(work)
    write(args, records, texts, ts, seq_len, imatrix_n, imatrix_len)


TORCH = "torch F32 eager"


def timed_rounds(records: list[dict], files: dict[str, Path], args) -> dict:
    """Every file and torch F32 timed in ``--speed-rounds`` alternating rounds (eval/common.alternating_speed):
    each record's prefill / decode become the medians (with the decode range); returns torch F32's."""
    runs = alternating_speed(files, args.speed_rounds, args.threads, torch_label=TORCH)
    for r in records:
        r["prefill_tok_s"], r["decode_tok_s"], r["decode_range"] = round_medians(runs[r["label"]])
    prefill, decode, decode_range = round_medians(runs[TORCH])
    return {
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "decode_range": decode_range,
        "threads": args.threads,
        "rounds": args.speed_rounds,
    }


def verdicts(records: list[dict], texts: list[str]) -> list[list[str]]:
    """Per type: llmopt's file against llama.cpp's imatrix file: size within +1%, lower ppl and KL on every text."""
    out = []
    for r in records:
        if not r["label"].startswith("llmopt gptq-"):
            continue
        ref = next((x for x in records if x["type"] == r["type"] and x["label"].endswith("+ imatrix")), None)
        if ref is None:
            continue
        size_ok = r["file_mib"] <= ref["file_mib"] * 1.01
        cells = [r["type"].upper(), f"{r['file_mib']:.1f} vs {ref['file_mib']:.1f}"]
        ok = size_ok
        for t in texts:
            a, b = r["texts"][t], ref["texts"][t]
            better = a["ppl"] < b["ppl"] and a["kl"] < b["kl"]
            ok &= better
            cells.append(f"{a['ppl']:.2f} / {a['kl']:.4f} vs {b['ppl']:.2f} / {b['kl']:.4f} {'✓' if better else '✗'}")
        out.append(cells + ["**yes**" if ok else "no"])
    return out


def write(args, records, texts, ts, seq_len, imatrix_n, imatrix_len) -> None:
    names = list(texts)
    header = ["type", "file", "MiB", "bits/weight", "smaller than F32"]
    header += [c for n in names for c in (f"ppl {n}", f"KL {n}", f"top-1 {n}")]
    header += ["prefill tok/s", "decode tok/s (range)", "decode × torch F32", "quantize s"]
    rows = []
    for r in records:
        cells = [
            r["type"].upper(),
            r["label"],
            fmt(r["file_mib"], 1),
            fmt(r["bpw"], 2),
            f"{100 * r['smaller_than_f32']:.1f}%",
        ]
        for n in names:
            t = r["texts"][n]
            cells += [f"{t['ppl']:.3f} ± {t['ppl_stderr']:.3f}", fmt(t["kl"], 4), f"{100 * t['top1']:.1f}%"]
        lo_hi = f" ({r['decode_range'][0]:.0f}-{r['decode_range'][1]:.0f})" if "decode_range" in r else ""
        cells += [fmt(r["prefill_tok_s"], 0), fmt(r["decode_tok_s"], 1) + lo_hi]
        cells.append(fmt(r["decode_tok_s"] / ts["decode_tok_s"], 1))
        cells.append(fmt(r["quantize_s"], 0))
        rows.append(cells)
    vh = ["type", "MiB llmopt vs llama.cpp+imatrix", *[f"{n}: ppl / KL llmopt vs llama.cpp+imatrix" for n in names]]
    windows = ", ".join(f"{n}: {records[0]['texts'][n]['windows']}" for n in names)
    specs = "".join(f" `{n}` = {describe_text(s)}." for n, s in texts.items())
    md = [
        "# GGUF frontier: llama.cpp's quantizer vs llmopt's shipped GPTQ recipes, SmolLM2-135M-Instruct (bundled)",
        "",
        f"Every file run by llama.cpp (llama-cpp-python); windows of {seq_len} tokens ({windows}); KL against the "
        "F32 GGUF on the same tokens. llama.cpp's imatrix and llmopt's calibration: the same "
        f"{imatrix_n} x {imatrix_len}-token windows (seed 0) of the first half of `valid.nounk.txt`. Every file "
        "has the tensor types llama.cpp's quantizer picks for its type (llmopt: `--type auto`); SmolLM2 is 576 "
        "wide, so most K / IQ4_XS tensors fall back per tensor (Q4_K→Q5_0, Q6_K→Q8_0, IQ4_XS→IQ4_NL, "
        f"Q3_K→Q4_0) exactly as in llama.cpp's own file.{specs} Speed: 512-token prompt, 128 greedy tokens, "
        f"{args.threads} threads; torch F32 eager in the same run: prefill {ts['prefill_tok_s']:.0f} tok/s, decode "
        f"{ts['decode_tok_s']:.1f} tok/s."
        + (
            f" Speeds: medians of {ts['rounds']} alternating rounds over every file and torch F32 at the end of the "
            "run (one warm-up each)."
            if ts.get("rounds")
            else " Speeds: each file timed once when it was made (median of 3 repeats), torch F32 after the last."
        )
        + (" QUICK RUN." if args.quick else ""),
        "",
        markdown_table(header, rows),
        "",
        "Verdict per type (llmopt's shipped recipe against llama.cpp with an importance matrix from the same windows):",
        "",
        markdown_table(vh + ["smaller-or-equal and better on every text"], verdicts(records, names)),
        "",
        f"Machine: {machine_note()}. Produced by `python eval/bench_gguf_frontier.py"
        + (f" --types {args.types}" if args.types != ",".join(TYPES) else "")
        + (" --no-cpu10x" if args.no_cpu10x else "")
        + (" --quick" if args.quick else "")
        + "".join(f" --eval {a}" for a in (args.eval or []))
        + (f" --windows {args.windows}" if args.windows != 8 else "")
        + (f" --speed-rounds {args.speed_rounds}" if args.speed_rounds != 3 else "")
        + out_flag(args.out, "gguf-frontier")
        + "`.",
    ]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"rows": records, "texts": names, "torch_f32_speed": ts}, indent=1))
    plot(records, names, args.out + ".png")
    Path(args.out + ".partial.json").unlink(missing_ok=True)
    print("\n".join(md))


def plot(records: list[dict], texts: list[str], path: str) -> None:
    """KL against file size per text (log KL, linear size over the quantized files), one marker style and label
    colour per source, labels on the side of the point their source keeps (plain llama.cpp left, the rest
    right); the Pareto front of each source joined by a line. F32 (KL 0, ~5x the size) is off the chart:
    named in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 5.5), squeeze=False)
    styles = {"llama.cpp": ("s", "tab:gray"), "llama.cpp + imatrix": ("^", "tab:blue"), "llmopt": ("o", "tab:red")}
    sizes = [r["file_mib"] for r in records if r["type"] != "F32"]
    f32 = next((r for r in records if r["type"] == "F32"), None)
    for ax, t in zip(axes[0], texts):
        for kind, (marker, color) in styles.items():
            pts = [r for r in records if r["type"] != "F32" and source_of(r) == kind]
            if not pts:
                continue
            xs = [r["file_mib"] for r in pts]
            ys = [max(r["texts"][t]["kl"], 1e-4) for r in pts]
            ax.scatter(xs, ys, marker=marker, color=color, s=50, label=kind, zorder=3)
            left = kind == "llama.cpp"
            for r, x, y in zip(pts, xs, ys):
                ax.annotate(
                    r["type"].upper(), (x, y), fontsize=7, color=color, xytext=(-5 if left else 5, 0),
                    textcoords="offset points", ha="right" if left else "left", va="center",
                )  # fmt: skip
            front = pareto(list(zip(xs, ys)))
            ax.plot(*zip(*front), color=color, alpha=0.5, lw=1)
        if f32:
            ax.plot([], [], " ", label=f"F32: {f32['file_mib']:.0f} MiB, KL 0 (off the chart)")
        if sizes:
            pad = 0.12 * (max(sizes) - min(sizes) or 10)
            ax.set_xlim(min(sizes) - pad, max(sizes) + 1.6 * pad)  # room for the labels right
        ax.set_yscale("log")
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel("KL vs F32 (log)")
        ax.set_title(t)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("SmolLM2-135M GGUF: KL vs size (lower left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def source_of(r: dict) -> str:
    if r["label"].startswith("llmopt"):
        return "llmopt"
    return "llama.cpp + imatrix" if r["label"].endswith("+ imatrix") else "llama.cpp"


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both size and KL, by size."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


if __name__ == "__main__":
    main()
