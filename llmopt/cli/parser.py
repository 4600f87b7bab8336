"""The ``llmopt`` argument parser: the commands, their options and help texts.

Each command's ``func`` (in :mod:`llmopt.cli.commands`) receives the parsed arguments."""

from __future__ import annotations

import argparse

from llmopt.cli.commands import (
    compress_command,
    eval_command,
    export_command,
    harness_command,
    push_command,
    recipes_command,
    report_command,
)


def _limit(text: str) -> int | float:
    """--limit: a whole number of documents, or a fraction below 1 (lm-eval's convention)."""
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmopt", description="Compress causal LMs and measure what it bought.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    p.add_argument("--debug", action="store_true", help="show the traceback of any error (accepted anywhere)")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="perplexity, KL vs a base model, speed")
    e.add_argument("model", help="bundled:smollm2, a Hub id, a local HF folder, or a .gguf file")
    e.add_argument("--backend", default="auto", help="torch (default for HF models) or gguf (default for .gguf)")
    e.add_argument("--data", default="wikitext2", help="wikitext2, c4, text:PATH[#A:B], hf:NAME[:CONFIG]:SPLIT")
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument(
        "--max-windows", type=int, default=None, help="score only the first N windows (c4: 256 unless given)"
    )
    e.add_argument("--base", default=None, help="reference model for KL divergence (same tokenizer)")
    e.add_argument("--speed", action="store_true", help="prefill tok/s (512-token prompt), decode tok/s (128)")
    e.add_argument("--repeats", type=int, default=3, help="timed --speed runs; median [min-max] (default 3)")
    e.add_argument("--threads", type=int, default=None, help="threads for every backend (default: physical cores)")
    e.add_argument("--json", default=None, help="write the result as JSON here")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=eval_command)

    c = sub.add_parser("compress", help="run a YAML recipe and save an HF model folder")
    c.add_argument("model")
    c.add_argument(
        "--recipe", required=True, help="a shipped recipe's name (sparsegpt-50; see `llmopt recipes`) or a YAML file"
    )
    c.add_argument("--output", required=True, help="output folder (written atomically)")
    c.add_argument("--calib", default=None, help="calibration data spec (overrides the recipe), e.g. self:32")
    c.add_argument("--calib-samples", type=int, default=None)
    c.add_argument("--calib-seq-len", type=int, default=None)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument(
        "--device", default=None, help="cpu (default), cuda, cuda:N, or auto (CUDA where there is one, else cpu)"
    )
    c.add_argument(
        "--true-sequential",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="calibrate each layer's Linears group by group in call order (q/k/v, o, gate/up, down); "
        "default: the recipe's calibration.true_sequential",
    )
    c.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="load, calibrate and save in this dtype (auto: the checkpoint's own; kernels compute in float32)",
    )
    c.add_argument(
        "--low-memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stream the model from its safetensors shards one decoder layer at a time, each written to OUTPUT "
        "once compressed (data-driven stages only); default: when its float32 size exceeds half the free memory",
    )
    c.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted or failed run of this command: a distill stage from its checkpoint in "
        "OUTPUT.ckpt/; with --export/--eval/--harness, a finished compression in OUTPUT is kept and only the "
        "missing exports, evaluations and reports are made",
    )
    c.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="with --eval: skip llama.cpp's own quantization of the input (imatrix, the recipe's file type), "
        "the reference row of the report",
    )
    c.add_argument("--export", default=None, help="after compressing, also write: gguf, onnx or gguf,onnx")
    c.add_argument(
        "--eval", action="store_true", help="evaluate every artifact and the input model (ppl, KL, size, speed)"
    )
    c.add_argument(
        "--eval-data", help="evaluation data spec (as `llmopt eval --data`; default: the recipe's evaluation.data)"
    )
    c.add_argument("--eval-seq-len", type=int, help="tokens per evaluation window (default: the recipe's, 2048)")
    c.add_argument("--eval-windows", type=int, help="evaluation windows (default: the recipe's, 8)")
    c.add_argument(
        "--speed", action=argparse.BooleanOptionalAction, default=True, help="time prefill/decode (default on)"
    )
    c.add_argument("--threads", type=int, default=None, help="threads for every backend (default: physical cores)")
    c.add_argument("--harness", default=None, help="lm-eval tasks to run on every artifact, e.g. arc_easy,piqa")
    c.add_argument("--harness-include-path", default=None, help="a folder of task YAMLs (local tasks)")
    c.add_argument("--harness-limit", type=_limit, default=None, help="documents per harness task")
    c.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the finished folder to the Hub")
    c.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    c.set_defaults(func=compress_command)

    x = sub.add_parser(
        "export", help="write a GGUF for llama.cpp or an ONNX folder (quantized Linears from their codes)"
    )
    x.add_argument("model", help="an llmopt output folder, a HF folder, a .gguf or bundled:smollm2")
    x.add_argument("--to", default="gguf", choices=["gguf", "onnx"])
    x.add_argument("--output", required=True, help="FILE.gguf, or the ONNX folder (written atomically)")
    x.add_argument(
        "--type", default="auto", help="auto (stored codes), f32, f16, or a llama.cpp type: q8_0, q4_k_m, ..."
    )
    x.add_argument(
        "--embedding-type",
        default=None,
        help="token embedding type (default: --type auto picks llama.cpp's choice for the file's type, e.g. q8_0 "
        "or q6_K, else f16; a llama.cpp type: llama.cpp's own)",
    )
    x.add_argument(
        "--output-type", default=None, help="output head type when not tied (default: as for --embedding-type)"
    )
    x.add_argument("--imatrix", default=None, help="llama.cpp types: imatrix file or calibration data spec")
    x.add_argument(
        "--quant",
        default=None,
        choices=["none", "int8-dynamic", "int4-rtn", "int4-hqq", "auto"],
        help="ONNX: none (float32), ONNX Runtime's int8-dynamic / int4-rtn / int4-hqq, or auto (stored codes)",
    )
    x.add_argument("--block-size", type=int, default=None, help="ONNX int4-rtn/int4-hqq block (default 32)")
    x.add_argument(
        "--accuracy-level",
        type=int,
        default=0,
        choices=[0, 1, 2, 3, 4],
        help="ONNX MatMulNBits: 0 float, 4 int8 activations",
    )
    x.add_argument(
        "--low-memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GGUF: write tensor by tensor from the safetensors shards, never holding the model; default: when "
        "its float32 size exceeds half the free memory",
    )
    x.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    x.set_defaults(func=export_command)

    h = sub.add_parser("push", help="upload a model folder to the Hugging Face Hub with a generated model card")
    h.add_argument("folder", help="an llmopt output folder (GGUF files, ONNX folders, eval JSON inside go too)")
    h.add_argument("repo_id", help="OWNER/NAME of the model repo (created if missing)")
    h.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its own)")
    h.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    h.add_argument("--commit-message", default=None)
    h.add_argument("--base-model", default=None, help="Hub id of the base model for the card (default: the source)")
    h.add_argument("--save-card", action="store_true", help="also write the generated card into FOLDER/README.md")
    h.add_argument("--dry-run", action="store_true", help="list the files and print the card; upload nothing")
    h.set_defaults(func=push_command)

    lm = sub.add_parser("harness", help="lm-evaluation-harness tasks on torch, llama.cpp (GGUF) or ONNX Runtime")
    lm.add_argument("model", help="bundled:smollm2, a Hub id, an HF folder, a .gguf file or an ONNX folder")
    lm.add_argument("--tasks", required=True, help="lm-eval task/group/tag names, comma-separated: arc_easy,piqa")
    lm.add_argument("--include-path", default=None, help="a folder of task YAMLs (as lm-eval's --include_path)")
    lm.add_argument("--limit", type=_limit, default=None, help="documents per task (a fraction if below 1)")
    lm.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's, else 0)")
    lm.add_argument("--batch-size", type=int, default=1, help="sequences per forward (torch; others score one)")
    lm.add_argument("--backend", default="auto", help="auto (.gguf → gguf, ONNX folder → onnx, else torch)")
    lm.add_argument("--max-length", type=int, default=None, help="context window in tokens (default: the model's)")
    lm.add_argument("--threads", type=int, default=None, help="threads for every backend (default: physical cores)")
    lm.add_argument("--kv-cache", default="f16", choices=["f16", "f32"], help="llama.cpp's KV cache (gguf only)")
    lm.add_argument("--documents", action="store_true", help="per-document log-likelihoods in the JSON")
    lm.add_argument("--json", default=None, help="write the result as JSON here (atomically)")
    lm.set_defaults(func=harness_command)

    rp = sub.add_parser("report", help="compare runs made with --eval: a table and plots (ppl vs size / speed)")
    rp.add_argument("runs", nargs="+", help="output folders of `llmopt compress ... --eval` (or their report.json)")
    rp.add_argument("--output", default=None, help="PNG to write (default llmopt-report.png)")
    rp.set_defaults(func=report_command)

    r = sub.add_parser("recipes", help="list the shipped recipes (usable by name: --recipe sparsegpt-50)")
    r.set_defaults(func=recipes_command)
    return p
