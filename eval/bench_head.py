"""The output head: GPTQ (the gptq stage's ``head``) vs llama.cpp's round-to-nearest at export, per head type.

On the bundled SmolLM2-135M the output head is tied to the token embedding (49152 x 576 = 28M of its 135M
weights, read whole for every decoded token). The decoder is the quickstart's (GPTQ q4_0, shipped defaults,
llama.cpp's mixture, calibrated on 32 x 512 tokens of the first half of WikiText-2 validation); only the head
changes between rows:

* ``rtn T``: the recipe without ``head``, exported with ``--type auto --embedding-type T`` (gguf-py's
  reference quantizer, llama.cpp's round-to-nearest); ``rtn q8_0`` is what ``--type auto`` writes today;
* ``gptq T``: the recipe with ``head: T``, exported with ``--type auto`` (the head's codes byte for byte).

Every file is scored by llama.cpp on the first ``--windows`` 2048-token windows of the second half of the text,
KL against the F32 GGUF of the input model (same runtime). The decoder's codes are the same in every row (the
head is quantized after the last layer), so the rows differ only by the head. Writes eval/results/head.md,
head.json.

    python eval/bench_head.py [--windows 8] [--types q8_0,q5_0,q4_0]
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

from common import EVAL, MODEL, REPO, CachedBackend, cleanup, fmt, machine_note, markdown_table, run_compress  # noqa: E402


def recipe(head: str | None) -> dict:
    stage = {"stage": "gptq", "format": "q4_0", **({"head": head} if head else {})}
    return {"name": f"quickstart-head-{head or 'none'}", "calibration": {"samples": 32, "seq_len": 512, "seed": 0},
            "stages": [stage]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--types", default="q8_0,q5_0,q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "eval" / "results" / "head"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from llmopt.backends.llamacpp_backend import LlamaCppBackend
    from llmopt.evaluation import evaluate
    from llmopt.exporters import export_gguf

    types = args.types.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-head-"))
    rows, raw = [], {}
    try:
        f32 = work / "f32.gguf"
        export_gguf(MODEL, str(f32), type="f32")
        base = CachedBackend(LlamaCppBackend(str(f32), threads=args.threads))
        files: dict[str, tuple[Path, dict]] = {}
        plain = work / "none"
        rep = run_compress(recipe(None), plain)
        for t in types:
            path = work / f"rtn-{t}.gguf"
            export_gguf(str(plain), str(path), type="auto", embedding_type=None if t == "q8_0" else t)
            files[f"rtn {t}" + (" (today's --type auto)" if t == "q8_0" else "")] = (path, {"compress": rep})
        for t in types:
            folder = work / f"gptq-{t}"
            rep = run_compress(recipe(t), folder)
            (head,) = [r for r in rep["linears"] if r.get("head")]
            path = work / f"gptq-{t}.gguf"
            export_gguf(str(folder), str(path), type="auto")
            files[f"gptq {t}"] = (path, {"compress": rep, "head": head})
            cleanup(folder)
        for label, (path, info) in files.items():
            t0 = time.perf_counter()
            r = evaluate(str(path), data=EVAL, seq_len=2048, max_windows=args.windows, base=base, progress=False)
            rep, head = info["compress"], info.get("head")
            raw[label] = {
                "file_bytes": path.stat().st_size,
                "eval": r.to_dict(),
                "compress_seconds": rep["compress_seconds"],
                "peak_rss_mib": rep["peak_rss_mib"],
                **({"head_seconds": head["seconds"], "head_loss": head["loss"]} if head else {}),
                "eval_seconds": round(time.perf_counter() - t0, 1),
            }
            rows.append([
                label, fmt(path.stat().st_size / 2**20, 1), f"{r.perplexity:.3f} ± {r.perplexity_stderr:.3f}",
                fmt(r.kl.mean, 4), fmt(r.kl.top1_agreement, 3), fmt(head["seconds"], 1) if head else "–",
                fmt(rep["peak_rss_mib"], 0),
            ])  # fmt: skip
            print(label, rows[-1], flush=True)
    finally:
        cleanup(work)
    header = ["head", "GGUF MiB", "perplexity", "KL vs F32", "top-1", "head GPTQ s", "compress peak RSS MiB"]
    f32_ppl = next(iter(raw.values()))["eval"]["kl"]["base_perplexity"]
    md = (
        f"# The output head: GPTQ vs round-to-nearest ({MODEL}, decoder: GPTQ q4_0 quickstart)\n\n"
        f"{args.windows} x 2048 tokens of the second half of WikiText-2 validation, scored by llama.cpp; KL vs the "
        f"F32 GGUF (perplexity {f32_ppl:.3f}). Written by `python eval/bench_head.py --windows {args.windows} "
        f"--types {args.types}`; {machine_note()} (shared with other jobs: seconds are indicative).\n\n"
        + markdown_table(header, rows)
        + "\n"
    )
    out = Path(args.out)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(md)


if __name__ == "__main__":
    main()
