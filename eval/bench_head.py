"""The output head: GPTQ (the gptq stage's ``head``) vs llama.cpp's round-to-nearest at export, per head type.

On the bundled SmolLM2-135M the output head is tied to the token embedding (49152 x 576 = 28M of its 135M
weights, read whole for every decoded token). The decoder is the shipped ``configs/gptq-q4_0.yaml`` (the
quickstart's: act-order, static groups, the scale search, the sink weight, llama.cpp's mixture, calibrated on
32 x 512 tokens of the first half of WikiText-2 validation); only the head changes between rows:

* ``rtn T``: the recipe without ``head``, exported with ``--type auto --embedding-type T`` (gguf-py's
  reference quantizer, llama.cpp's round-to-nearest); ``rtn q8_0`` is what ``--type auto`` writes today;
* ``gptq T``: the recipe with ``head: T``, exported with ``--type auto`` (the head's codes byte for byte).

Every file is scored by llama.cpp on the first ``--windows`` 2048-token windows of the second half of the text
and of every ``--eval`` text (nothing calibrates on them), KL against the F32 GGUF of the input model (same
runtime). The decoder's codes are the same in every row (the head is quantized after the last layer), so the
rows differ only by the head. Writes eval/results/head.md, head.json.

    python eval/bench_head.py [--windows 8] [--types q8_0,q5_0,q4_0] [--eval lee] [--eval newsgroups]
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

import yaml  # noqa: E402
from common import (  # noqa: E402
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
    require_text,
    run_compress,
)

SHIPPED = REPO / "configs" / "gptq-q4_0.yaml"


def recipe(head: str | None) -> dict:
    """The shipped gptq-q4_0 recipe, with ``head`` set on its gptq stage (None: as shipped, no head)."""
    r = yaml.safe_load(SHIPPED.read_text())
    r["name"] = f"gptq-q4_0-head-{head or 'none'}"
    if head:
        r["stages"][0]["head"] = head
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--types", default="q8_0,q5_0,q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval", action="append", help="extra text: 'lee', 'newsgroups' or NAME=DATA_SPEC (repeatable)")
    ap.add_argument("--out", default=str(REPO / "eval" / "results" / "head"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    require_text()
    texts = {"wiki2-2nd-half": EVAL, **(eval_texts(args.eval) if args.eval else {})}
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
            evals = {
                t: evaluate(str(path), data=spec, seq_len=2048, max_windows=args.windows, base=base, progress=False)
                for t, spec in texts.items()
            }
            rep, head = info["compress"], info.get("head")
            raw[label] = {
                "file_bytes": path.stat().st_size,
                "eval": {t: {**r.to_dict(), "model": path.name, "data": t} for t, r in evals.items()},  # no paths
                "compress_seconds": rep["compress_seconds"],
                "peak_rss_mib": rep["peak_rss_mib"],
                **({"head_seconds": head["seconds"], "head_loss": head["loss"]} if head else {}),
                "eval_seconds": round(time.perf_counter() - t0, 1),
            }
            cells = [
                c
                for r in evals.values()
                for c in (
                    f"{r.perplexity:.3f} ± {r.perplexity_stderr:.3f}",
                    fmt(r.kl.mean, 4),
                    fmt(r.kl.top1_agreement, 3),
                )
            ]
            rows.append([label, fmt(path.stat().st_size / 2**20, 1), *cells,
                         fmt(head["seconds"], 1) if head else "–", fmt(rep["peak_rss_mib"], 0)])  # fmt: skip
            print(label, rows[-1], flush=True)
    finally:
        cleanup(work)
    header = ["head", "GGUF MiB", *[c for t in texts for c in (f"ppl {t}", f"KL {t}", f"top-1 {t}")],
              "head GPTQ s", "compress peak RSS MiB"]  # fmt: skip
    first = next(iter(raw.values()))["eval"]
    dense = ", ".join(f"{t} {first[t]['kl']['base_perplexity']:.3f}" for t in texts)
    flags = "".join(f" --eval {e}" for e in args.eval or [])
    md = (
        f"# The output head: GPTQ vs round-to-nearest ({MODEL}, decoder: shipped gptq-q4_0)\n\n"
        f"{args.windows} x 2048 tokens per text, scored by llama.cpp; KL vs the F32 GGUF (its perplexity: {dense}). "
        "Texts: " + ", ".join(f"`{t}` = {describe_text(s)}" for t, s in texts.items()) + ". "
        f"Written by `python eval/bench_head.py --windows {args.windows} --types {args.types}{flags}`; "
        f"{machine_note()}.\n\n" + markdown_table(header, rows) + "\n"
    )
    out = Path(args.out)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(md)


if __name__ == "__main__":
    main()
