"""Quantization benchmark on the bundled SmolLM2-135M: RTN vs GPTQ on the same formats.

Same text split as the pruning benchmark: calibration 32 x 512 tokens (seed 0) from the first half of
WikiText-2 validation (valid.nounk.txt), evaluation on 2048-token windows of the second half. Each
compression runs in its own process; KL is against the same cached dense logits. The bundled model's
Linear weights were Q4_1 to begin with, so q4_1 / asymmetric int4 g32 would be nearly lossless and
rank nothing: the comparison uses symmetric int4 g64, int3 g64, q4_0, q8_0 and 2:4 + int4 g64.
Writes eval/results/quant.md (and .json).

    python eval/bench_quant.py [--windows 8] [--quick]
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

SGPT24 = {"stage": "sparsegpt", "pattern": "2:4"}
W4G64 = {"format": "int", "bits": 4, "group_size": 64, "symmetric": True}
CAL = {"data": "wikitext2", "samples": 32, "seq_len": 512, "seed": 0}
PAIRS = [
    # (scheme label, RTN recipe, GPTQ recipe)
    ("int4 g64 sym", "configs/rtn-w4g64.yaml", "configs/gptq-w4g64.yaml"),
    ("int3 g64 sym", "configs/rtn-w3g64.yaml", "configs/gptq-w3g64.yaml"),
    ("q4_0", "configs/rtn-q4_0.yaml", "configs/gptq-q4_0.yaml"),
    ("q8_0", "configs/rtn-q8_0.yaml", "configs/gptq-q8_0.yaml"),
    # variants, run on demand with --only (RTN twin already above)
    (
        "int4 g64 sym, static groups",
        None,
        {"calibration": CAL, "stages": [{"stage": "gptq", **W4G64, "static_groups": True}]},
    ),
    ("int4 g64 sym, act-order + static groups", None, "configs/gptq-w4g64-actorder.yaml"),
    (
        "2:4 + int4 g64",
        {"calibration": CAL, "stages": [SGPT24, {"stage": "rtn", **W4G64}]},
        "configs/sparsegpt-2of4-gptq-w4g64.yaml",
    ),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8, help="2048-token evaluation windows")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--quick", action="store_true", help="2 windows, 8x256 calibration: a smoke run")
    ap.add_argument("--only", default=None, help="';'-separated scheme labels to run (default: all but the variants)")
    ap.add_argument("--out", default=str(REPO / "eval" / "results" / "quant"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    require_text()
    extra = ["--calib-samples", "8", "--calib-seq-len", "256"] if args.quick else []
    windows = 2 if args.quick else args.windows
    pairs = [p for p in PAIRS if (p[0] in args.only.split(";") if args.only else "," not in p[0])]

    from llmopt.backends.torch_backend import TorchBackend

    dense = CachedBackend(TorchBackend.from_spec(MODEL))
    t0 = time.perf_counter()
    dense_r = evaluate_folder(dense, None, args.seq_len, windows)  # fills the logits cache
    print(f"dense: ppl {dense_r.perplexity:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows, records = [], []
    work = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    try:
        for scheme, *recipes in pairs:
            for method, recipe in zip(("RTN", "GPTQ"), recipes):
                if recipe is None:
                    continue
                out = work / "model"
                src = recipe if isinstance(recipe, dict) else str(REPO / recipe)
                rep = run_compress(src, out, extra)
                r = evaluate_folder(str(out), dense, args.seq_len, windows)
                quant = [v for k, v in rep["stages"].items() if "bits_per_weight" in v][0]
                rec = dict(
                    scheme=scheme,
                    method=method,
                    recipe=recipe if isinstance(recipe, str) else "(inline: sparsegpt 2:4 + rtn int4 g64)",
                    ppl=r.perplexity,
                    ppl_ratio=r.perplexity / dense_r.perplexity,
                    kl_mean=r.kl.mean,
                    top1=r.kl.top1_agreement,
                    bits_per_weight=quant["bits_per_weight"],
                    compress_seconds=rep["compress_seconds"],
                    peak_rss_mib=rep["peak_rss_mib"],
                )
                records.append(rec)
                rows.append(
                    [
                        scheme,
                        method,
                        fmt(r.perplexity, 3),
                        fmt(rec["ppl_ratio"], 3) + "x",
                        fmt(r.kl.mean, 4),
                        f"{100 * r.kl.top1_agreement:.1f}%",
                        fmt(quant["bits_per_weight"], 3),
                        fmt(rep["compress_seconds"], 1),
                        fmt(rep["peak_rss_mib"] / 1024, 2),
                    ]
                )
                print(rows[-1], flush=True)
                cleanup(out)
    finally:
        cleanup(work)
    header = ["scheme", "method", "ppl", "ppl / dense", "KL vs dense", "same top-1", "bits/weight (Linears)",
              "compress s", "peak RSS GiB"]  # fmt: skip
    md = [
        "# Quantization: SmolLM2-135M-Instruct (bundled), WikiText-2",
        "",
        f"Dense perplexity **{dense_r.perplexity:.3f}** on {dense_r.windows} windows x {args.seq_len} tokens of the "
        "second half of `valid.nounk.txt` (GPTQ protocol). Calibration: 32 x 512 tokens, seed 0, first half"
        + (" (QUICK RUN: 8 x 256, 2 windows)" if args.quick else "")
        + ".",
        "Bits/weight counts codes plus fp16 scales (and zero-points / mins) of the quantized Linears; embeddings",
        "stay float. `compress s` = layer-wise engine incl. kernels (model load/save excluded; RTN is data-free).",
        "",
        markdown_table(header, rows),
        "",
        f"Machine: {machine_note()}. Produced by `python eval/bench_quant.py`.",
    ]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"dense_ppl": dense_r.perplexity, "rows": records}, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
