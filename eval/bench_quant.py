"""Quantization benchmark on the bundled SmolLM2-135M: RTN vs GPTQ on the same formats, and the study that
chose the shipped GPTQ defaults.

Same text split as the pruning benchmark: calibration 32 x 512 tokens (seed 0) from the first half of
WikiText-2 validation (valid.nounk.txt), evaluation on 2048-token windows of the second half (and of any
other text given with ``--eval NAME=SPEC``; ``--eval lee`` is the Lee news text, see eval/common.py).
Each compression runs in its own process; KL is against the same cached dense logits. The bundled
model's Linear weights were Q4_1 to begin with, so q4_1 / asymmetric int4 g32 would be nearly lossless
and rank nothing: the comparison uses symmetric int4 g64, int3 g64, q4_0, q8_0 and 2:4 + int4 g64.
Writes eval/results/quant.md (and .json).

``--study``: for int4 g64, int3 g64 and q4_0, GPTQ with dynamic groups (the paper) or act-order +
static groups, each with and without the Hessian-weighted scale search (``mse_grid: 20``), each
evaluated on every ``--eval`` text; writes eval/results/gptq-defaults.md (rows in the order run; a
partial run writes what it has: ``--max-rows``).

    python eval/bench_quant.py [--windows 8] [--quick]
    python eval/bench_quant.py --study --windows 6 \
        --eval wiki2=text:../shared/data/wikitext-2/valid.nounk.txt#0.5:1 --eval lee
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
    describe_text,
    eval_texts,
    evaluate_folder,
    fmt,
    machine_note,
    markdown_table,
    require_text,
    run_compress,
)

SGPT24 = {"stage": "sparsegpt", "pattern": "2:4"}
W4G64 = {"format": "int", "bits": 4, "group_size": 64, "symmetric": True}
W3G64 = {"format": "int", "bits": 3, "group_size": 64, "symmetric": True}
Q4_0 = {"format": "q4_0"}
CAL = {"data": "wikitext2", "samples": 32, "seq_len": 512, "seed": 0}
ACT = {"act_order": True, "static_groups": True}
SEARCH = {"mse_grid": 20}
# the paper's plain GPTQ, spelled out: the gptq stage defaults to act-order + static groups + search
PLAIN = {"act_order": False, "static_groups": False, "mse_grid": 0}


def inline(*stages: dict) -> dict:
    return {"calibration": CAL, "stages": list(stages)}


PAIRS = [
    # (scheme label, RTN recipe, GPTQ recipe)
    ("int4 g64 sym", "configs/rtn-w4g64.yaml", "configs/gptq-w4g64.yaml"),
    ("int3 g64 sym", "configs/rtn-w3g64.yaml", "configs/gptq-w3g64.yaml"),
    ("q4_0", "configs/rtn-q4_0.yaml", "configs/gptq-q4_0.yaml"),
    ("q8_0", "configs/rtn-q8_0.yaml", "configs/gptq-q8_0.yaml"),
    ("2:4 + int4 g64", inline(SGPT24, {"stage": "rtn", **W4G64}), "configs/sparsegpt-2of4-gptq-w4g64.yaml"),
]

# --study: (scheme, setting, GPTQ recipe), most decisive first
_VARIANTS = {
    "dynamic groups": PLAIN,
    "dynamic groups + search": PLAIN | SEARCH,
    "act-order + static groups": PLAIN | ACT,
    "act-order + static groups + search": PLAIN | ACT | SEARCH,
}
_SCHEMES = {"int4 g64 sym": W4G64, "int3 g64 sym": W3G64, "q4_0": Q4_0}
STUDY = [
    (scheme, setting, inline({"stage": "gptq", **_SCHEMES[scheme], **_VARIANTS[setting]}))
    for scheme, setting in (
        ("int3 g64 sym", "act-order + static groups + search"),
        ("int3 g64 sym", "dynamic groups + search"),
        ("int4 g64 sym", "act-order + static groups + search"),
        ("q4_0", "act-order + static groups + search"),
        ("int3 g64 sym", "dynamic groups"),
        ("int4 g64 sym", "dynamic groups + search"),
        ("q4_0", "dynamic groups + search"),
        ("int3 g64 sym", "act-order + static groups"),
        ("int4 g64 sym", "act-order + static groups"),
        ("q4_0", "act-order + static groups"),
        ("int4 g64 sym", "dynamic groups"),
        ("q4_0", "dynamic groups"),
    )
]


def run_rows(jobs, texts: dict[str, str], args, extra: list[str], on_record=None):
    """Compress each (scheme, method, recipe) in its own process, evaluate on every text; returns records.
    ``on_record(records, dense_ppl)`` is called after each one (results are written as they come)."""
    from llmopt.backends.torch_backend import TorchBackend

    dense = CachedBackend(TorchBackend.from_spec(MODEL))
    dense_ppl = {}
    for name, spec in texts.items():
        t0 = time.perf_counter()
        dense_ppl[name] = evaluate_folder(dense, None, args.seq_len, args.windows, data=spec).perplexity
        print(f"dense {name}: ppl {dense_ppl[name]:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    records = []
    work = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    try:
        for scheme, method, recipe in jobs:
            if args.only and scheme not in args.only.split(";") and method not in args.only.split(";"):
                continue
            out = work / "model"
            src = recipe if isinstance(recipe, dict) else str(REPO / recipe)
            rep = run_compress(src, out, extra)
            quant = [v for k, v in rep["stages"].items() if "bits_per_weight" in v][0]
            rec = dict(
                scheme=scheme,
                method=method,
                recipe=recipe,
                bits_per_weight=quant["bits_per_weight"],
                compress_seconds=rep["compress_seconds"],
                peak_rss_mib=rep["peak_rss_mib"],
                texts={},
            )
            for name, spec in texts.items():
                r = evaluate_folder(str(out), dense, args.seq_len, args.windows, data=spec)
                rec["texts"][name] = dict(
                    ppl=r.perplexity, ppl_ratio=r.perplexity / dense_ppl[name], kl_mean=r.kl.mean,
                    top1=r.kl.top1_agreement,
                )  # fmt: skip
            first = rec["texts"][next(iter(texts))]
            rec |= {k: first[k] for k in ("ppl", "ppl_ratio", "kl_mean", "top1")}  # first text: quant.json's keys
            records.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k != "recipe"}), flush=True)
            if on_record:
                on_record(records, dense_ppl)
            cleanup(out)
    finally:
        cleanup(work)
    return records, dense_ppl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8, help="2048-token evaluation windows per text")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--quick", action="store_true", help="2 windows, 8x256 calibration: a smoke run")
    ap.add_argument("--only", default=None, help="';'-separated scheme or method labels to run")
    ap.add_argument("--eval", action="append", help="NAME=DATA_SPEC evaluation text (repeatable); 'lee' = Lee news")
    ap.add_argument("--study", action="store_true", help="the GPTQ settings study behind the shipped defaults")
    ap.add_argument("--out", default=None, help="output path without suffix (default results/quant or gptq-defaults)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    require_text()
    extra = ["--calib-samples", "8", "--calib-seq-len", "256"] if args.quick else []
    if args.quick:
        args.windows = 2
    texts = eval_texts(args.eval)
    if args.study:
        jobs = [(s, m, r) for s, m, r in STUDY]
    else:
        jobs = [(s, meth, r) for s, *recipes in PAIRS for meth, r in zip(("RTN", "GPTQ"), recipes)]
    out_path = args.out or str(REPO / "eval" / "results" / ("gptq-defaults" if args.study else "quant"))
    run_rows(jobs, texts, args, extra, on_record=lambda rec, dense: write(rec, dense, texts, args, out_path))


def write(records: list[dict], dense_ppl: dict[str, float], texts: dict[str, str], args, out_path: str) -> None:
    header = ["scheme", "method"]
    for name in texts:
        header += [f"ppl {name}", f"KL {name}"]
    header += ["bits/weight (Linears)", "compress s", "peak RSS GiB"]
    rows = []
    for rec in records:
        cells = [rec["scheme"], rec["method"]]
        for name in texts:
            cells += [fmt(rec["texts"][name]["ppl"], 3), fmt(rec["texts"][name]["kl_mean"], 4)]
        cells += [fmt(rec["bits_per_weight"], 3), fmt(rec["compress_seconds"], 1), fmt(rec["peak_rss_mib"] / 1024, 2)]
        rows.append(cells)
    dense_txt = ", ".join(f"{n} {p:.3f}" for n, p in dense_ppl.items())
    texts_txt = "; ".join(f"`{n}` = {describe_text(s)}" for n, s in texts.items())
    title = "GPTQ settings study" if args.study else "Quantization"
    md = [
        f"# {title}: SmolLM2-135M-Instruct (bundled)",
        "",
        f"Dense perplexity {dense_txt} on {args.windows} windows x {args.seq_len} tokens per text (GPTQ protocol); "
        f"texts: {texts_txt}. Calibration: 32 x 512 tokens, seed 0, first half of `valid.nounk.txt`"
        + (" (QUICK RUN: 8 x 256, 2 windows)" if args.quick else "")
        + ". No evaluated token was seen in calibration.",
        "Bits/weight counts codes plus fp16 scales (and zero-points / mins) of the quantized Linears; embeddings",
        "stay float. `compress s` = layer-wise engine incl. kernels (model load/save excluded; RTN is data-free).",
        "",
        markdown_table(header, rows),
        "",
        f"Machine: {machine_note()}. Produced by `python eval/bench_quant.py{' --study' if args.study else ''}`.",
    ]
    Path(out_path + ".md").write_text("\n".join(md) + "\n")
    Path(out_path + ".json").write_text(json.dumps({"dense_ppl": dense_ppl, "rows": records}, indent=1, default=str))
    print("\n".join(md))


if __name__ == "__main__":
    main()
