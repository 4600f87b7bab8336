"""ONNX Runtime benchmark: torch F32 vs ONNX F32 vs ONNX Runtime's int8-dynamic / int4 RTN / int4 HQQ vs
int4 from llmopt's GPTQ written exactly as MatMulNBits (``--quant auto``), at accuracy level 0 and 4, with
llama.cpp's Q4_0 on the same windows for reference.

Every row is scored on the same token ids (the bundled SmolLM2 tokenizer, second half of the WikiText-2
validation text) and windows; KL and same-top-1 are against torch F32's logits (cached once). Speed:
``llmopt.metrics.measure_speed`` (512-token prompt, 128 greedy tokens, one warm-up, median of
``--repeats``), the same thread count on every backend.

    python eval/bench_onnx.py --gptq-int4 DIR --gptq-q4_0 DIR     # GPTQ folders from llmopt compress
    python eval/bench_onnx.py --only "int4 RTN"                    # re-run rows, merge into the JSON
    python eval/bench_onnx.py --plot-only

Results: ``eval/results/onnx.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import EVAL, MODEL, REPO, CachedBackend, fmt, markdown_table, require_text  # noqa: E402

log = logging.getLogger("bench_onnx")


def rows(a: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """(label, kind, export kwargs). kind: torch | onnx | gguf."""
    bs = a.block_size
    out: list[tuple[str, str, dict]] = [
        ("torch F32", "torch", {}),
        ("ONNX F32", "onnx", {"model_spec": MODEL, "quant": "none"}),
        ("ONNX Runtime int8-dynamic", "onnx", {"model_spec": MODEL, "quant": "int8-dynamic"}),
    ]
    for level in (0, 4):
        out += [
            (f"ONNX Runtime int4 RTN b{bs} acc{level}", "onnx",
             {"model_spec": MODEL, "quant": "int4-rtn", "block_size": bs, "accuracy_level": level}),
            (f"ONNX Runtime int4 HQQ b{bs} acc{level}", "onnx",
             {"model_spec": MODEL, "quant": "int4-hqq", "block_size": bs, "accuracy_level": level}),
        ]  # fmt: skip
        if a.gptq_int4:
            out.append((f"llmopt GPTQ int4 g{bs} (auto) acc{level}", "onnx",
                        {"model_spec": a.gptq_int4, "quant": "auto", "accuracy_level": level}))  # fmt: skip
        if a.gptq_q4_0:
            out.append((f"llmopt GPTQ q4_0 + scale search (auto) acc{level}", "onnx",
                        {"model_spec": a.gptq_q4_0, "quant": "auto", "accuracy_level": level}))  # fmt: skip
    out.append(("llama.cpp Q4_0 (its quantizer)", "gguf", {"type": "q4_0"}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--gptq-int4", default=None, help="llmopt folder: GPTQ int4 symmetric, groups of --block-size")
    ap.add_argument("--gptq-q4_0", default=None, help="llmopt folder: GPTQ q4_0 (configs/gptq-q4_0.yaml)")
    ap.add_argument("--work", default="/tmp/llmopt-bench-onnx", help="where exports are written")
    ap.add_argument("--only", default=None, help="comma-separated substrings of row labels to run")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--out", default=str(REPO / "eval" / "results" / "onnx"))
    ap.add_argument("--plot-only", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("optimum", "onnxruntime", "llmopt.exporters"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out_json = Path(a.out).with_suffix(".json")
    prev = json.loads(out_json.read_text()) if out_json.is_file() else {"records": []}
    if a.plot_only:
        plot(prev["records"], str(Path(a.out).with_suffix(".png")))
        write_md(prev, Path(a.out).with_suffix(".md"))
        return
    require_text()

    import torch

    from llmopt.backends import make_backend, resolve_threads
    from llmopt.data import evaluation_tokens
    from llmopt.exporters import export_gguf, export_onnx
    from llmopt.metrics import make_windows, measure_speed, score_windows
    from llmopt.models import load_tokenizer

    threads = resolve_threads(a.threads)
    tok = load_tokenizer(MODEL)
    tokens = evaluation_tokens(EVAL, tok)
    windows = make_windows(tokens, a.seq_len, a.windows)
    prompt = tokens[:512]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    base = CachedBackend(make_backend("torch", MODEL, threads=threads))

    records = {r["label"]: r for r in prev["records"]}
    for label, kind, kw in rows(a):
        if a.only and not any(s.strip() in label for s in a.only.split(",")):
            continue
        log.info("== %s", label)
        t0 = time.perf_counter()
        rec: dict = {"label": label, "kind": kind, **{k: v for k, v in kw.items() if k != "model_spec"}}
        if kind == "torch":
            be, path = base.inner, None
        elif kind == "onnx":
            path = work / label.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "")
            rep = export_onnx(kw["model_spec"], str(path), overwrite=True,
                              **{k: v for k, v in kw.items() if k != "model_spec"})  # fmt: skip
            rec.update(file_mib=rep["file_bytes"] / 2**20, matmul_nbits=rep["matmul_nbits"],
                       linears_exact=rep["linears_exact"], export_s=rep["seconds"])  # fmt: skip
            check = load_tokenizer(str(path))(EVAL_CHECK, add_special_tokens=False)["input_ids"]
            assert check == tok(EVAL_CHECK, add_special_tokens=False)["input_ids"], "tokenizer changed"
            be = make_backend("onnx", str(path), threads=threads)
        else:
            path = work / "llamacpp-q4_0.gguf"
            rep = export_gguf(MODEL, str(path), type=kw["type"], overwrite=True)
            rec.update(file_mib=rep["file_bytes"] / 2**20)
            be = make_backend("gguf", str(path), threads=threads)
        if kind == "torch":
            rec["file_mib"] = sum(p.numel() * 4 for p in be.model.parameters()) / 2**20
        nll, n_scored, kl, *_ = score_windows(be, windows, base=base, progress=False)
        rec.update(ppl=float(torch.tensor(nll).exp()), tokens_scored=n_scored)
        if kl is not None:
            rec.update(kl_mean=kl["mean"], kl_p99=kl["p99"], top1=kl["top1_agreement"])
        if not a.no_speed:
            s = measure_speed(be, prompt, 128, repeats=a.repeats)
            rec.update(prefill_tok_s=s.prefill_tok_s, decode_tok_s=s.decode_tok_s, threads=s.threads, dtype=s.dtype,
                       decode_min=s.decode_tok_s_min, decode_max=s.decode_tok_s_max)  # fmt: skip
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        log.info("%s", {k: v for k, v in rec.items() if k in ("ppl", "kl_mean", "top1", "decode_tok_s", "file_mib")})
        if kind != "torch":
            be.close()
        records[label] = rec
        order = [r[0] for r in rows(a)]
        recs = sorted(records.values(), key=lambda r: order.index(r["label"]) if r["label"] in order else 99)
        result = {
            "setting": {
                "model": MODEL,
                "data": EVAL,
                "windows": int(windows.shape[0]),
                "seq_len": a.seq_len,
                "threads": threads,
                "block_size": a.block_size,
                "gptq_int4": a.gptq_int4,
                "gptq_q4_0": a.gptq_q4_0,
                "load_average": os.getloadavg(),
            },
            "records": recs,
        }
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=1))
        write_md(result, Path(a.out).with_suffix(".md"))
    plot(list(records.values()), str(Path(a.out).with_suffix(".png")))


EVAL_CHECK = " The city of the river was first in 1990 , and 17 ( 3.5 ) @-@ song\n\n = = War = =\n"


def write_md(result: dict, path: Path) -> None:
    s = result.get("setting", {})
    header = ["variant", "MiB", "perplexity", "KL mean", "KL p99", "same top-1", "prefill tok/s", "decode tok/s"]
    body = []
    for r in result["records"]:
        body.append([
            r["label"], fmt(r.get("file_mib"), 1), fmt(r.get("ppl"), 3), fmt(r.get("kl_mean"), 4),
            fmt(r.get("kl_p99"), 3), f"{100 * r['top1']:.2f}%" if "top1" in r else "",
            fmt(r.get("prefill_tok_s"), 0), fmt(r.get("decode_tok_s"), 1),
        ])  # fmt: skip
    text = f"""# ONNX Runtime: llmopt's exact GPTQ int4 in MatMulNBits vs ONNX Runtime's own quantizers

`python eval/bench_onnx.py` (see the script). {s.get("model")}, {s.get("windows")} windows x {s.get("seq_len")}
tokens of {s.get("data")} (identical token ids for every row), KL / same top-1 against torch F32's logits;
speed: 512-token prompt prefill, 128 greedy decode tokens with the KV cache, median of the timed runs,
{s.get("threads")} threads on every backend (load average during the run: {s.get("load_average")}: the
machine was shared, so speeds are indicative only). File size: the ONNX files (embeddings and tied head in
float32 in every ONNX row), the GGUF file for llama.cpp. ONNX prefill computes the logits of all 512 prompt
positions (optimum's graphs have no `logits_to_keep`); torch and llama.cpp compute the last one only.
`accN`: MatMulNBits `accuracy_level` (0: float32 activations; 4: activations quantized to int8 per block).
GPTQ folders: int4 = `{s.get("gptq_int4")}`, q4_0 = `{s.get("gptq_q4_0")}`.

{markdown_table(header, body)}
"""
    path.write_text(text)


def plot(records: list[dict], path: str) -> None:
    """Perplexity and decode speed per variant (two panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if "ppl" in r]
    if not recs:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(recs) + 1.5), sharey=True)
    y = range(len(recs))
    colors = ["tab:green" if r["label"].startswith("llmopt") else "tab:gray" for r in recs]
    ax1.barh(list(y), [r["ppl"] for r in recs], color=colors)
    ax1.set_yticks(list(y), [r["label"] for r in recs], fontsize=8)
    ax1.invert_yaxis()
    lo = min(r["ppl"] for r in recs)
    ax1.set_xlim(lo * 0.95, max(r["ppl"] for r in recs) * 1.02)
    ax1.set_xlabel("perplexity (lower is better)")
    ax2.barh(list(y), [r.get("decode_tok_s", 0) for r in recs], color=colors)
    ax2.set_xlabel("decode tok/s (KV cache)")
    fig.suptitle("SmolLM2-135M on ONNX Runtime (green: llmopt GPTQ codes as MatMulNBits)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
