"""GGUF benchmark: llama.cpp's own quantizer vs llmopt's RTN/GPTQ exports, all run by llama.cpp.

For the bundled SmolLM2-135M: file size, bits per weight, perplexity, KL vs the F32 GGUF, prefill and
decode tokens/s, all through llama-cpp-python on the same token windows (second half of WikiText-2
validation, 2048-token windows; calibration and imatrix: 32 x 512 tokens of the first half, seed 0, the
same windows for both). Every file has a q8_0 token embedding (tied with the output head), so sizes
differ only by how the Linears are stored. Torch F32 eager speed is measured in the same run.
Writes eval/results/gguf.md, gguf.json and gguf.png (perplexity against file size).

    python eval/bench_gguf.py [--windows 8] [--quick] [--paired A,B]

Perplexities carry llama-perplexity's ± (per-token standard error). ``--paired A,B`` adds, for two row
labels (substrings), the per-window difference of their mean NLL on every text, with windows as the unit
(a t-interval over windows; tokens within a window are not independent, so this is the honest one).
The F32 reference keeps every window's logits in memory (~200 MB each): for whole texts use
``bench_gguf_paired.py``, which runs all files window by window instead.
"""

from __future__ import annotations

import json
import logging
import math
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
    cleanup,
    describe_text,
    eval_texts,
    fmt,
    machine_note,
    markdown_table,
    paired_diff,
    require_text,
    run_compress,
    text_bench_args,
)

EMB = "q8_0"  # token embedding (= output head, tied) type in every file
SGPT24 = {"stage": "sparsegpt", "pattern": "2:4"}
CAL = {"data": "wikitext2", "samples": 32, "seq_len": 512, "seed": 0}
# plain GPTQ spelled out (the gptq stage defaults to act-order + static groups + search)
Q4_0 = {"stage": "gptq", "format": "q4_0", "act_order": False, "static_groups": False, "mse_grid": 0}

# (label, source, how): source "dense" → llama.cpp quantizes the F32 model with type `how`
# (+ imatrix when label says so); otherwise an llmopt recipe, exported with --type auto.
ROWS = [
    ("llama.cpp F32", "dense", "f32"),
    ("llama.cpp Q8_0", "dense", "q8_0"),
    ("llama.cpp Q4_1", "dense", "q4_1"),
    ("llama.cpp Q4_0", "dense", "q4_0"),
    ("llama.cpp Q4_0 + imatrix", "dense", "q4_0"),
    ("llama.cpp Q4_K_M", "dense", "q4_k_m"),
    ("llama.cpp Q4_K_M + imatrix", "dense", "q4_k_m"),
    ("llmopt RTN q8_0", "configs/rtn-q8_0.yaml", "auto"),
    ("llmopt GPTQ q8_0", "configs/gptq-q8_0.yaml", "auto"),
    ("llmopt RTN q4_1", "configs/rtn-q4_1.yaml", "auto"),
    ("llmopt GPTQ q4_1", "configs/gptq-q4_1.yaml", "auto"),
    ("llmopt RTN q4_0", "configs/rtn-q4_0.yaml", "auto"),
    # the shipped config: act-order + static groups + Hessian-weighted scale search (eval/results/gptq-defaults.md)
    ("llmopt GPTQ q4_0 (shipped gptq-q4_0)", "configs/gptq-q4_0.yaml", "auto"),
    ("llmopt GPTQ q4_0, plain (dynamic groups, no search)", {"calibration": CAL, "stages": [Q4_0]}, "auto"),
    ("llmopt GPTQ q4_0, dynamic groups + search", {"calibration": CAL, "stages": [Q4_0 | {"mse_grid": 20}]}, "auto"),
    (
        "llmopt SparseGPT 2:4 + GPTQ q4_0",
        {"calibration": CAL, "stages": [SGPT24, {"stage": "gptq", "format": "q4_0"}]},
        "auto",
    ),
]


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
    ap = text_bench_args(__doc__.splitlines()[0], 8, "windows per text (the F32 logits of each are cached)", "gguf")
    ap.add_argument("--quick", action="store_true", help="2 windows of 512, 8x256 calibration: a smoke run")
    ap.add_argument("--only", default=None, help="comma-separated substrings of row labels to run")
    ap.add_argument("--paired", default=None, help="A,B: two row-label substrings compared window by window")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out + ".json").read_text())["rows"], args.out + ".png")
        return
    logging.basicConfig(level=logging.WARNING)
    require_text()
    extra = ["--calib-samples", "8", "--calib-seq-len", "256"] if args.quick else []
    windows, seq_len = (2, 512) if args.quick else (args.windows, args.seq_len)
    imatrix_n, imatrix_len = (8, 256) if args.quick else (32, 512)
    extra_texts = eval_texts(args.eval) if args.eval else {}

    from llmopt.backends.llamacpp_backend import LlamaCppBackend
    from llmopt.evaluation import evaluate
    from llmopt.exporters import export_gguf

    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    records, rows = [], []
    try:
        f32 = work / "f32.gguf"
        export_gguf(MODEL, str(f32), type="f32")
        base = CachedBackend(LlamaCppBackend(str(f32), threads=args.threads))
        order = ROWS
        if args.only:  # rows in the order the substrings are given (the most important first)
            keys = args.only.split(",")
            order = [r for r in ROWS if r[0] == "llama.cpp F32"] + sorted(
                (r for r in ROWS if r[0] != "llama.cpp F32" and any(k in r[0] for k in keys)),
                key=lambda r: min(i for i, k in enumerate(keys) if k in r[0]),
            )
        for label, source, how in order:
            path = work / "model.gguf"
            seconds = None
            if source == "dense":
                imatrix = CALIB if "imatrix" in label else None
                if how == "f32":
                    path = f32
                else:
                    t0 = time.perf_counter()
                    export_gguf(
                        MODEL,
                        str(path),
                        type=how,
                        embedding_type=EMB,
                        overwrite=True,
                        imatrix=imatrix,
                        imatrix_samples=imatrix_n,
                        imatrix_seq_len=imatrix_len,
                        threads=args.threads,
                    )
                    seconds = time.perf_counter() - t0
            else:
                folder = work / "compressed"
                src = source if isinstance(source, dict) else str(REPO / source)
                rep = run_compress(src, folder, extra)
                seconds = rep["compress_seconds"]
                export_gguf(str(folder), str(path), type="auto", embedding_type=EMB, overwrite=True)
                cleanup(folder)
            r = evaluate(
                str(path),
                data=EVAL,
                seq_len=seq_len,
                max_windows=windows,
                base=base,
                speed=True,
                threads=args.threads,
                progress=False,
            )
            others = {
                name: evaluate(str(path), data=spec, seq_len=seq_len, max_windows=windows, base=base, progress=False)
                for name, spec in extra_texts.items()
            }
            size = path.stat().st_size
            n_params = 134_515_008  # SmolLM2-135M parameters (embedding counted once: tied)
            rec = dict(
                label=label,
                file_mib=size / 2**20,
                bpw=8 * size / n_params,
                ppl=r.perplexity,
                kl_mean=r.kl.mean,
                top1=r.kl.top1_agreement,
                prefill_tok_s=r.speed.prefill_tok_s,
                decode_tok_s=r.speed.decode_tok_s,
                threads=r.speed.threads,
                quantize_seconds=seconds,
                ppl_stderr=r.perplexity_stderr,
                windows=r.windows,
                window_nll=r.window_nll,
                texts={
                    n: dict(
                        ppl=o.perplexity,
                        ppl_stderr=o.perplexity_stderr,
                        kl_mean=o.kl.mean,
                        top1=o.kl.top1_agreement,
                        windows=o.windows,
                        window_nll=o.window_nll,
                    )
                    for n, o in others.items()
                },
            )
            records.append(rec)
            rows.append(
                [
                    label,
                    fmt(rec["file_mib"], 1),
                    fmt(rec["bpw"], 2),
                    f"{r.perplexity:.3f} ± {r.perplexity_stderr:.3f}",
                    fmt(r.kl.mean, 4),
                    f"{100 * r.kl.top1_agreement:.1f}%",
                    *[
                        c
                        for o in others.values()
                        for c in (f"{o.perplexity:.3f} ± {o.perplexity_stderr:.3f}", fmt(o.kl.mean, 4))
                    ],
                    fmt(r.speed.prefill_tok_s, 0),
                    fmt(r.speed.decode_tok_s, 1),
                    fmt(seconds, 1),
                ]
            )
            print(rows[-1], flush=True)
            Path(args.out + ".partial.json").write_text(json.dumps({"rows": records}, indent=1))
            if path != f32:
                path.unlink(missing_ok=True)
        ts = torch_speed(args.threads)
    finally:
        cleanup(work)
    header = [
        "model",
        "file MiB",
        "bits/weight (file)",
        "ppl",
        "KL vs F32",
        "same top-1",
        *[c for n in extra_texts for c in (f"ppl {n}", f"KL {n}")],
        "prefill tok/s",
        "decode tok/s",
        "quantize s",
    ]
    n_windows = f"{records[0]['windows']}" if records else "?"
    if extra_texts and records:
        n_windows += " (" + ", ".join(f"{n}: {records[0]['texts'][n]['windows']}" for n in extra_texts) + ")"
    md = [
        "# GGUF: llama.cpp quantizer vs llmopt exports, SmolLM2-135M-Instruct (bundled), run by llama.cpp",
        "",
        f"Perplexity (± per-token standard error) on {n_windows} windows x {seq_len} tokens of the second "
        "half of `valid.nounk.txt` (GPTQ protocol) through llama-cpp-python; KL against the F32 GGUF on the "
        "same windows. Calibration and "
        f"imatrix: the same {imatrix_n} x {imatrix_len}-token windows (seed 0) of the first half. Token "
        f"embedding (tied output) is {EMB} in every quantized file. Speed: 512-token prompt, 128 greedy "
        f"tokens, {args.threads} threads, llama.cpp's perf counters. `quantize s`: llama.cpp's quantizer (imatrix "
        "included) or llmopt's layer-wise engine (model load/save excluded)."
        + "".join(f" Extra text `{n}` = {describe_text(s)}." for n, s in extra_texts.items())
        + (" QUICK RUN." if args.quick else ""),
        "",
        markdown_table(header, rows),
        "",
        f"Torch F32 eager on the same machine, same run: prefill {ts['prefill_tok_s']:.0f} tok/s, decode "
        f"{ts['decode_tok_s']:.1f} tok/s ({ts['threads']} threads).",
        *(paired_section(records, args.paired, ["wiki2-2nd-half", *extra_texts]) if args.paired else []),
        "",
        f"Machine: {machine_note()}. Produced by `python eval/bench_gguf.py`.",
    ]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"rows": records, "torch_f32_speed": ts}, indent=1))
    plot(records, args.out + ".png")
    Path(args.out + ".partial.json").unlink(missing_ok=True)
    print("\n".join(md))


def paired_section(records: list[dict], spec: str, names: list[str]) -> list[str]:
    """Row A minus row B, window by window, on every text: mean ΔNLL with a 95% t-interval over windows
    (exp of it: the perplexity ratio A/B), and in how many windows A is lower."""
    a_key, b_key = spec.split(",")
    a = next(r for r in records if a_key in r["label"])
    b = next(r for r in records if b_key in r["label"])
    out = [
        "",
        f"Paired, window by window: **{a['label']}** minus **{b['label']}** (mean NLL per window; "
        "negative = A better; 95% t-interval with windows as the unit):",
        "",
        "| text | windows | mean ΔNLL | 95% interval | ppl ratio A/B | windows where A is lower |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        wa = a["window_nll"] if name == names[0] else a["texts"][name]["window_nll"]
        wb = b["window_nll"] if name == names[0] else b["texts"][name]["window_nll"]
        if len(wa) != len(wb):
            raise ValueError(f"{name}: {len(wa)} windows against {len(wb)}")
        mean, lo, hi, lower, n = paired_diff(wa, wb)
        out.append(f"| {name} | {n} | {mean:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {math.exp(mean):.4f} | {lower} of {n} |")
    return out


def plot(records: list[dict], path: str) -> None:
    """Perplexity against file size, one legend entry per file; the y range covers the 4-8 bit cluster
    (rows beyond it are listed in the legend with their perplexity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    cmap = plt.get_cmap("tab20")
    dense = min(r["ppl"] for r in records)
    top = dense * 1.25
    for i, r in enumerate(records):
        own = r["label"].startswith("llmopt")
        label = f"{r['label']} ({r['ppl']:.2f})"
        y = min(r["ppl"], top)
        ax.scatter(r["file_mib"], y, s=60, marker="o" if own else "s", color=cmap(i % 20), label=label,
                   edgecolors="black" if own else "none")  # fmt: skip
    ax.set_xscale("log")
    ax.set_ylim(dense * 0.98, top * 1.01)
    ax.set_xlabel("file size (MiB, log scale)")
    ax.set_ylabel("perplexity (llama.cpp; capped at the top edge)")
    ax.set_title("SmolLM2-135M GGUF: perplexity vs size (circles: llmopt, squares: llama.cpp quantizer)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
