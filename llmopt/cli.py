"""Command line: ``llmopt eval``, ``llmopt compress``, ``llmopt export``, ``llmopt push``, ``llmopt harness``,
``llmopt recipes``.

Each command is a few lines over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback


def _write_json(path: str, result: dict) -> None:
    """``--json PATH``, atomically; if writing fails the result is printed, then the one-line error."""
    from llmopt.errors import LLMOptError
    from llmopt.outputs import write_text

    text = json.dumps(result, indent=1)
    try:
        write_text(path, text, flag="--json")
    except LLMOptError as e:
        print(text)  # the results are not lost
        raise LLMOptError(f"{e} (the JSON result is printed above)") from None


def _eval(a: argparse.Namespace) -> int:
    from llmopt.errors import LLMOptError
    from llmopt.evaluation import evaluate, format_result

    if a.repeats < 1:
        raise LLMOptError(f"--repeats must be >= 1, got {a.repeats}")
    if a.threads is not None and a.threads < 1:
        raise LLMOptError(f"--threads must be >= 1, got {a.threads}")
    if a.json:
        from llmopt.outputs import preflight

        preflight(a.json, overwrite=True, kind="file", flag="--json")  # before minutes of evaluation
    r = evaluate(
        a.model,
        data=a.data,
        seq_len=a.seq_len,
        max_windows=a.max_windows,
        base=a.base,
        speed=a.speed,
        backend=a.backend,
        threads=a.threads,
        speed_repeats=a.repeats,
        progress=not a.quiet,
    )
    print(format_result(r), flush=True)
    if a.json:
        _write_json(a.json, r.to_dict())
    return 0


def _pipeline_options(a: argparse.Namespace):
    """The options after the stages, or None when the command is a plain compression."""
    if not (a.export or a.eval or a.harness or a.push_to_hub):
        return None
    from llmopt.pipeline import PipelineOptions

    return PipelineOptions(
        export=PipelineOptions.parse_exports(a.export),
        eval=a.eval,
        eval_data=a.eval_data,
        eval_seq_len=a.eval_seq_len,
        eval_windows=a.eval_windows,
        speed=a.speed,
        threads=a.threads,
        harness_tasks=a.harness,
        harness_include_path=a.harness_include_path,
        harness_limit=a.harness_limit,
        push_to_hub=a.push_to_hub,
        private=a.private,
    )


def _run_pipeline(a: argparse.Namespace, opts) -> int:
    from llmopt.pipeline import estimate_seconds, run_pipeline
    from llmopt.pipeline.report import HEADER, markdown_table, table_rows
    from llmopt.recipe import apply_calibration_overrides, parse_recipe

    rec = apply_calibration_overrides(
        parse_recipe(a.recipe),
        data=a.calib,
        samples=a.calib_samples,
        seq_len=a.calib_seq_len,
        seed=a.seed,
        true_sequential=a.true_sequential,
    )
    opts = opts.with_recipe(rec)
    opts.check()  # bad export target, data, include path, repo id: before any model is loaded
    from llmopt.pipeline.run import model_parameter_count

    n = model_parameter_count(a.model)
    if n:
        est = estimate_seconds(n, rec, opts)
        print(f"expected duration: ~{max(1, round(est / 60))} min on this machine's scale ({n / 1e6:.0f}M parameters)")
    report = run_pipeline(
        a.model,
        rec,
        a.output,
        opts,
        overwrite=a.overwrite,
        compress_kwargs=dict(device=a.device, dtype=a.dtype, resume=a.resume),
    )
    print(f"saved {a.output}: report.json, report.md, report.png, README.md (model card)")
    print(markdown_table(HEADER, table_rows(report)))
    if "push" in report:
        from llmopt.hub.push import format_push

        print(format_push(report["push"]))
    return 0


def _report(a: argparse.Namespace) -> int:
    from llmopt.pipeline import compare

    table, png = compare(a.runs, output=a.output)
    print(table)
    print(f"plot: {png}" if png else "no evaluated rows to plot (runs made without --eval)")
    return 0


def _compress(a: argparse.Namespace) -> int:
    from llmopt.compression import compress

    opts = _pipeline_options(a)
    if opts is not None:
        return _run_pipeline(a, opts)
    res = compress(
        a.model,
        a.recipe,
        a.output,
        calib=a.calib,
        calib_samples=a.calib_samples,
        calib_seq_len=a.calib_seq_len,
        seed=a.seed,
        overwrite=a.overwrite,
        device=a.device,
        true_sequential=a.true_sequential,
        dtype=a.dtype,
        resume=a.resume,
    )
    r = res.report
    print(f"saved {res.output} ({r['dtype']}, true_sequential={r['true_sequential']})")
    for key, s in r["stages"].items():
        extra = ""
        if "sparsity" in s:
            extra += f" sparsity {100 * s['sparsity']:.2f}%"
        if "bits_per_weight" in s:
            extra += f" {s['bits_per_weight']:.3f} bits/weight"
        print(f"  stage {key}: {s['linears']} Linears{extra}, kernels {s['seconds']:.1f} s")
    for key, d in r.get("model_stages", {}).items():
        print(f"  stage {key}: {_model_stage_summary(d)}")
    print(
        f"  compress {r['compress_seconds']:.1f} s, total {r['total_seconds']:.1f} s, "
        f"peak RSS {r['peak_rss_mib']:.0f} MiB"
    )
    return 0


def _model_stage_summary(d: dict) -> str:
    """One line for a whole-model stage's report (distill or structured), from the keys that stage writes."""
    if "heldout_before" in d:  # distill
        before, after = d["heldout_before"], d["heldout_after"]
        return (
            f"{d['tokens']} tokens in {d['steps']} steps, {d['minutes']:.1f} min "
            f"(stopped by {d['stopped_by']}), held-out KL {before['kl']:.4f} -> {after['kl']:.4f}"
        )
    if "non_embedding_fraction" in d:  # structured
        sizes = ", ".join(f"{k} {d['before'][k]} -> {v}" for k, v in d["after"].items() if v != d["before"].get(k))
        return (
            f"{sizes or 'no change'}; {d['params_after']:,} parameters, "
            f"{100 * d['non_embedding_fraction']:.1f}% of the non-embedding ones kept"
        )
    return ", ".join(f"{k} {v}" for k, v in d.items() if isinstance(v, int | float | str))


def _export(a: argparse.Namespace) -> int:
    from llmopt.exporters import export_gguf

    if a.to == "onnx":
        return _export_onnx(a)
    if a.quant or a.block_size is not None or a.accuracy_level:
        from llmopt.errors import LLMOptError

        raise LLMOptError("--quant/--block-size/--accuracy-level are ONNX options; with --to gguf use --type")
    r = export_gguf(
        a.model,
        a.output,
        type=a.type,
        embedding_type=a.embedding_type,
        output_type=a.output_type,
        overwrite=a.overwrite,
        imatrix=a.imatrix,
    )
    types = ", ".join(f"{n} {k}" for k, n in sorted(r["tensor_types"].items()))
    print(f"saved {r['output']}: {r['file_bytes'] / 2**20:.1f} MiB, {r['bits_per_weight']:.3f} bits/weight")
    print(f"  tensors: {types}; Linears {r['linear_bits_per_weight']:.3f} bits/weight; pre {r['pre_tokenizer']}")
    return 0


def _export_onnx(a: argparse.Namespace) -> int:
    from llmopt.errors import LLMOptError
    from llmopt.exporters import export_onnx

    if a.type != "auto" or a.embedding_type or a.output_type or a.imatrix:
        raise LLMOptError(
            "--type/--embedding-type/--output-type/--imatrix are GGUF options; with --to onnx use --quant"
        )
    r = export_onnx(
        a.model,
        a.output,
        quant=a.quant or "none",
        block_size=a.block_size,
        accuracy_level=a.accuracy_level,
        overwrite=a.overwrite,
    )
    print(f"saved {r['output']}: {r['file_bytes'] / 2**20:.1f} MiB ONNX, --quant {r['quant']}")
    print(
        f"  {r['matmul_nbits']} MatMulNBits (block {r['block_size']}, accuracy level {r['accuracy_level']}, "
        f"{r['linears_exact']} from stored codes), {r['dynamic_int8']} dynamic int8, {r['matmul_float']} float MatMul"
    )
    return 0


def _harness(a: argparse.Namespace) -> int:
    import llmopt.harness as h

    if a.json:
        from llmopt.outputs import preflight

        preflight(a.json, overwrite=True, kind="file", flag="--json")  # before any model is loaded
    r = h.harness(
        a.model,
        a.tasks,
        include_path=a.include_path,
        limit=a.limit,
        num_fewshot=a.num_fewshot,
        batch_size=a.batch_size,
        backend=a.backend,
        max_length=a.max_length,
        threads=a.threads,
        kv_cache=a.kv_cache,
        documents=a.documents,
    )
    print(h.format_harness(r), flush=True)
    if a.json:
        _write_json(a.json, r)
    return 0


def _limit(text: str) -> int | float:
    """--limit: a whole number of documents, or a fraction below 1 (lm-eval's convention)."""
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _push(a: argparse.Namespace) -> int:
    from llmopt.hub.push import format_push, push

    r = push(
        a.folder,
        a.repo_id,
        private=a.private,
        revision=a.revision,
        commit_message=a.commit_message,
        dry_run=a.dry_run,
        base_model=a.base_model,
        save_card=a.save_card,
    )
    print(format_push(r))
    return 0


def _recipes(a: argparse.Namespace) -> int:
    from llmopt.recipe import recipe_summary, shipped_recipes

    recipes = shipped_recipes()
    width = max(map(len, recipes))
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_summary(path)}")
    return 0


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
    e.set_defaults(func=_eval)

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
    c.add_argument("--device", default=None, help="cpu (default) or cuda")
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
        "--resume",
        action="store_true",
        help="continue a distill stage from the checkpoint an interrupted run of this command left in OUTPUT.ckpt/",
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
    c.set_defaults(func=_compress)

    x = sub.add_parser(
        "export", help="write a GGUF for llama.cpp or an ONNX folder (quantized Linears from their codes)"
    )
    x.add_argument("model", help="an llmopt output folder, a HF folder, a .gguf or bundled:smollm2")
    x.add_argument("--to", default="gguf", choices=["gguf", "onnx"])
    x.add_argument("--output", required=True, help="FILE.gguf, or the ONNX folder (written atomically)")
    x.add_argument(
        "--type", default="auto", help="auto (stored codes), f32, f16, or a llama.cpp type: q8_0, q4_k_m, ..."
    )
    x.add_argument("--embedding-type", default=None, help="token embedding type (default f16)")
    x.add_argument("--output-type", default=None, help="output head type when not tied (default f16)")
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
    x.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    x.set_defaults(func=_export)

    h = sub.add_parser("push", help="upload a model folder to the Hugging Face Hub with a generated model card")
    h.add_argument("folder", help="an llmopt output folder (GGUF files, ONNX folders, eval JSON inside go too)")
    h.add_argument("repo_id", help="OWNER/NAME of the model repo (created if missing)")
    h.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its own)")
    h.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    h.add_argument("--commit-message", default=None)
    h.add_argument("--base-model", default=None, help="Hub id of the base model for the card (default: the source)")
    h.add_argument("--save-card", action="store_true", help="also write the generated card into FOLDER/README.md")
    h.add_argument("--dry-run", action="store_true", help="list the files and print the card; upload nothing")
    h.set_defaults(func=_push)

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
    lm.set_defaults(func=_harness)

    rp = sub.add_parser("report", help="compare runs made with --eval: a table and plots (ppl vs size / speed)")
    rp.add_argument("runs", nargs="+", help="output folders of `llmopt compress ... --eval` (or their report.json)")
    rp.add_argument("--output", default=None, help="PNG to write (default llmopt-report.png)")
    rp.set_defaults(func=_report)

    r = sub.add_parser("recipes", help="list the shipped recipes (usable by name: --recipe sparsegpt-50)")
    r.set_defaults(func=_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every failure ends with exactly one last stderr line ``error: ...``.

    Input errors (:class:`LLMOptError`) exit 2, SIGINT 130, SIGTERM 143, anything unexpected 1 (a bug:
    ``--debug``, anywhere on the command line, shows the traceback of any error)."""
    from llmopt.errors import LLMOptError
    from llmopt.outputs import Interrupted, install_signal_handlers

    install_signal_handlers()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LLMOPT_DEBUG", "").strip().lower() in {"1", "true", "yes"}
    argv = [x for x in argv if x != "--debug"]
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
        )
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return args.func(args)
    except LLMOptError as e:
        return _fail(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else 'failed'}", 2, debug)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        name = signal.Signals(signum).name
        return _fail(f"error: interrupted ({name})", 128 + int(signum), debug)
    except SystemExit:
        raise
    except Exception as e:  # a bug, not an input error: still one line unless --debug
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return _fail(f"error: internal error {type(e).__name__}: {msg} (--debug shows the traceback)", 1, debug)


def _fail(line: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
