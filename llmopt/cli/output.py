"""What the commands print: the summaries of a compression, an export and the shipped recipes, and the
``--json`` file (written atomically; printed when it cannot be written, so no result is lost)."""

from __future__ import annotations

import json

from llmopt import outputs
from llmopt.errors import LLMOptError


def write_json(path: str, result: dict) -> None:
    """``--json PATH``, atomically; if writing fails the result is printed, then the one-line error."""
    text = json.dumps(result, indent=1)
    try:
        outputs.write_text(path, text, flag="--json")  # looked up at call time (tests replace it)
    except LLMOptError as e:
        print(text)  # the results are not lost
        raise LLMOptError(f"{e} (the JSON result is printed above)") from None


def format_estimate(n_params: int, est) -> str:
    """The line printed before a run: its expected duration, the model's size and the parts of at least
    half a minute (``est``: :class:`llmopt.pipeline.estimate.Estimate`)."""
    minutes = max(1, round(est.seconds / 60))
    parts = ", ".join(f"{k} {v / 60:.1f}" if v < 600 else f"{k} {v / 60:.0f}" for k, v in est.parts.items() if v >= 30)
    return f"expected duration: ~{minutes} min on this machine's scale ({n_params / 1e6:.0f}M parameters)" + (
        f": {parts} min" if parts else ""
    )


def format_compress(output, r: dict) -> str:
    """A compression's report (``CompressResult.report``): dtype, each stage's line, seconds and peak RSS."""
    lines = [f"saved {output} ({r['dtype']}, true_sequential={r['true_sequential']})"]
    for key, s in r["stages"].items():
        extra = ""
        if "sparsity" in s:
            extra += f" sparsity {100 * s['sparsity']:.2f}%"
        if "bits_per_weight" in s:
            extra += f" {s['bits_per_weight']:.3f} bits/weight"
        lines.append(f"  stage {key}: {s['linears']} Linears{extra}, kernels {s['seconds']:.1f} s")
    for key, d in r.get("model_stages", {}).items():
        lines.append(f"  stage {key}: {model_stage_summary(d)}")
    lines.append(
        f"  compress {r['compress_seconds']:.1f} s, total {r['total_seconds']:.1f} s, "
        f"peak RSS {r['peak_rss_mib']:.0f} MiB"
    )
    return "\n".join(lines)


def model_stage_summary(d: dict) -> str:
    """One line for a whole-model stage's report (distill or structured), from the keys that stage writes."""
    if "heldout_before" in d:  # distill
        before, after = d["heldout_before"], d["heldout_after"]
        key = "kl" if "kl" in before else "kl_topk_bound"  # the full KL, or its top-k bucket bound
        return (
            f"{d['tokens']} tokens in {d['steps']} steps, {d['minutes']:.1f} min "
            f"(stopped by {d['stopped_by']}), {d['heldout_kl']} {before[key]:.4f} -> {after[key]:.4f}"
        )
    if "non_embedding_fraction" in d:  # structured
        sizes = ", ".join(f"{k} {d['before'][k]} -> {v}" for k, v in d["after"].items() if v != d["before"].get(k))
        return (
            f"{sizes or 'no change'}; {d['params_after']:,} parameters, "
            f"{100 * d['non_embedding_fraction']:.1f}% of the non-embedding ones kept"
        )
    return ", ".join(f"{k} {v}" for k, v in d.items() if isinstance(v, int | float | str))


def format_gguf_export(r: dict) -> str:
    """``export_gguf``'s report: file size, bits per weight, tensor types, pre-tokenizer."""
    types = ", ".join(f"{n} {k}" for k, n in sorted(r["tensor_types"].items()))
    return (
        f"saved {r['output']}: {r['file_bytes'] / 2**20:.1f} MiB, {r['bits_per_weight']:.3f} bits/weight\n"
        f"  tensors: {types}; Linears {r['linear_bits_per_weight']:.3f} bits/weight; pre {r['pre_tokenizer']}"
    )


def format_onnx_export(r: dict) -> str:
    """``export_onnx``'s report: folder size, quantization, how many MatMuls of each kind."""
    return (
        f"saved {r['output']}: {r['file_bytes'] / 2**20:.1f} MiB ONNX, --quant {r['quant']}\n"
        f"  {r['matmul_nbits']} MatMulNBits (block {r['block_size']}, accuracy level {r['accuracy_level']}, "
        f"{r['linears_exact']} from stored codes), {r['dynamic_int8']} dynamic int8, {r['matmul_float']} float MatMul"
    )


def format_recipes(summaries: dict[str, str]) -> str:
    """Recipe name → summary, one aligned line each."""
    width = max(map(len, summaries))
    return "\n".join(f"{name:<{width}}  {summary}" for name, summary in summaries.items())
