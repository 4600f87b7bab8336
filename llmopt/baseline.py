"""What an llmopt artifact bought beside the baseline row, llama.cpp's own quantizer at the same file type with
an importance matrix from the same calibration windows: the numbers (in ``report.json``), their markdown table
(``report.md`` and the model card) and notes where a stage bought nothing in an exported runtime."""

from __future__ import annotations

import math


def beside_baseline(rows: list[dict]) -> dict | None:
    """Each llmopt artifact against the baseline row (llama.cpp's own quantizer at the same file type):
    differences in perplexity and KL, size and decode speed as ratios. None without a measured baseline."""
    base = next((r for r in rows if r.get("role") == "baseline" and r.get("perplexity") is not None), None)
    if base is None:
        return None
    vs = {}
    for r in rows:
        if r.get("role") != "llmopt" or r.get("perplexity") is None:
            continue
        d = {
            "perplexity": r["perplexity"],
            "d_perplexity": r["perplexity"] - base["perplexity"],
            "d_perplexity_pct": 100 * (r["perplexity"] / base["perplexity"] - 1),
        }
        if r.get("kl") is not None and base.get("kl") is not None:
            d["d_kl"] = r["kl"] - base["kl"]
        if r.get("size_bytes") and base.get("size_bytes"):
            d["size_ratio"] = r["size_bytes"] / base["size_bytes"]
        if r.get("decode_tok_s") and base.get("decode_tok_s"):
            d["decode_ratio"] = r["decode_tok_s"] / base["decode_tok_s"]
        vs[r["artifact"]] = d
    return {"artifact": base["artifact"], "label": base.get("label"), "perplexity": base["perplexity"],
            "kl": base.get("kl"), "size_bytes": base.get("size_bytes"), "vs": vs}  # fmt: skip


def notes(recipe, artifacts: dict) -> list[str]:
    """What a stage bought nothing for in an exported runtime: unstructured or N:M zeros are stored as ordinary
    codes by llama.cpp's blocks and ONNX Runtime's MatMulNBits (same bytes, same speed)."""
    out = []
    exported = [t for t in ("gguf", "onnx") if t in artifacts]
    for st in getattr(recipe, "stages", []):
        sparsity = getattr(st, "sparsity", None)
        if sparsity and exported and getattr(st, "pattern", None) is not None:
            pattern = "unstructured" if st.pattern == "unstructured" else f"{st.pattern} (N:M)"
            out.append(
                f"Stage {st.stage}: its {sparsity:.0%} {pattern} zeros buy no size or speed in the "
                f"{' and '.join(x.upper() for x in exported)} export"
                + ("s" if len(exported) > 1 else "")
                + " (stored as ordinary codes, every weight read); they cost quality that a quantization-only "
                "recipe keeps."
            )
    return out


def baseline_markdown(report: dict) -> list[str]:
    """The answer to "is this better than llama-quantize?": every llmopt artifact beside the baseline row."""
    b = report.get("baseline")
    if not b or not b.get("vs"):
        return []
    lines = [
        f"## Beside llama.cpp's own quantizer ({b.get('label') or b['artifact']}, same windows)",
        "",
        "| artifact | perplexity | Δ perplexity | KL | Δ KL | size vs baseline | decode vs baseline |",
        "|---|---|---|---|---|---|---|",
        f"| {b.get('label') or b['artifact']} (baseline) | {_fmt(b['perplexity'])} | – | {_fmt(b.get('kl'), '.4f')} "
        "| – | 1.00x | 1.00x |",
    ]
    rows = {r["artifact"]: r for r in report["rows"]}
    for art, d in b["vs"].items():
        lines.append(
            f"| {art} | {_fmt(d['perplexity'])} | {d['d_perplexity']:+.3f} ({d['d_perplexity_pct']:+.1f}%) "
            f"| {_fmt(rows.get(art, {}).get('kl'), '.4f')} | {_fmt(d.get('d_kl'), '+.4f')} "
            f"| {_fmt(d.get('size_ratio'), '.3f')}x | {_fmt(d.get('decode_ratio'), '.2f')}x |"
        )
    return [*lines, ""]


def _fmt(x, spec=".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)
