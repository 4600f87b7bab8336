"""The bodies of the ``llmopt`` commands: each checks what only the command line can get wrong, calls the
Python API and prints what :mod:`llmopt.cli.output` formats.

The API modules (torch, transformers, lm-eval behind them) are imported inside the commands, so that
``llmopt --help`` and argument errors stay fast."""

from __future__ import annotations

import argparse

from llmopt.cli.output import (
    format_compress,
    format_estimate,
    format_gguf_export,
    format_onnx_export,
    format_recipes,
    write_json,
)
from llmopt.errors import LLMOptError
from llmopt.outputs import preflight
from llmopt.parallel import main_process


def eval_command(a: argparse.Namespace) -> int:
    from llmopt.evaluation import evaluate, format_result

    if a.repeats < 1:
        raise LLMOptError(f"--repeats must be >= 1, got {a.repeats}")
    if a.threads is not None and a.threads < 1:
        raise LLMOptError(f"--threads must be >= 1, got {a.threads}")
    if a.json:
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
        write_json(a.json, r.to_dict())
    return 0


def compress_command(a: argparse.Namespace) -> int:
    from llmopt.compression import compress

    opts = _pipeline_options(a)
    if opts is not None:
        return _run_pipeline(a, opts)
    rec = _recipe(a)
    preflight(a.output, overwrite=a.overwrite, kind="folder")  # an output error comes before the estimate
    _print_estimate(a, rec, None)
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
        low_memory=a.low_memory,
    )
    if main_process():  # under torchrun process 0 wrote the output and reports it
        print(format_compress(res.output, res.report))
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
        baseline=a.baseline,
    )


def _recipe(a: argparse.Namespace):
    from llmopt.recipe import apply_calibration_overrides, parse_recipe

    return apply_calibration_overrides(
        parse_recipe(a.recipe),
        data=a.calib,
        samples=a.calib_samples,
        seq_len=a.calib_seq_len,
        seed=a.seed,
        true_sequential=a.true_sequential,
    )


def _print_estimate(a: argparse.Namespace, rec, opts) -> None:
    """The expected duration, before any model is loaded (none for a Hub id: its size is not known yet)."""
    from llmopt.pipeline import PipelineOptions, estimate
    from llmopt.pipeline.options import model_parameter_count

    n = model_parameter_count(a.model)
    if n and main_process():
        print(format_estimate(n, estimate(n, rec, opts or PipelineOptions().with_recipe(rec))), flush=True)


def _run_pipeline(a: argparse.Namespace, opts) -> int:
    """``compress`` with ``--export``/``--eval``/``--harness``/``--push-to-hub``: the whole pipeline."""
    from llmopt.pipeline import run_pipeline
    from llmopt.pipeline.report import HEADER, markdown_table, table_rows

    rec = _recipe(a)
    opts = opts.with_recipe(rec)
    opts.check()  # bad export target, data, include path, repo id: before any model is loaded
    _print_estimate(a, rec, opts)
    report = run_pipeline(
        a.model,
        rec,
        a.output,
        opts,
        overwrite=a.overwrite,
        resume=a.resume,
        compress_kwargs=dict(device=a.device, dtype=a.dtype, low_memory=a.low_memory),
    )
    print(f"saved {a.output}: report.json, report.md, report.png, README.md (model card)")
    print(markdown_table(HEADER, table_rows(report)))
    if "push" in report:
        from llmopt.hub.push import format_push

        print(format_push(report["push"]))
    return 0


def report_command(a: argparse.Namespace) -> int:
    from llmopt.pipeline import compare

    table, png = compare(a.runs, output=a.output)
    print(table)
    print(f"plot: {png}" if png else "no evaluated rows to plot (runs made without --eval)")
    return 0


def export_command(a: argparse.Namespace) -> int:
    from llmopt.exporters import export_gguf

    if a.to == "onnx":
        return _export_onnx(a)
    if a.quant or a.block_size is not None or a.accuracy_level:
        raise LLMOptError("--quant/--block-size/--accuracy-level are ONNX options; with --to gguf use --type")
    r = export_gguf(
        a.model,
        a.output,
        type=a.type,
        embedding_type=a.embedding_type,
        output_type=a.output_type,
        overwrite=a.overwrite,
        imatrix=a.imatrix,
        low_memory=a.low_memory,
    )
    print(format_gguf_export(r))
    return 0


def _export_onnx(a: argparse.Namespace) -> int:
    from llmopt.exporters import export_onnx

    if a.type != "auto" or a.embedding_type or a.output_type or a.imatrix or a.low_memory:
        raise LLMOptError(
            "--type/--embedding-type/--output-type/--imatrix/--low-memory are GGUF options; with --to onnx use "
            "--quant (the ONNX export loads the model whole)"
        )
    r = export_onnx(
        a.model,
        a.output,
        quant=a.quant or "none",
        block_size=a.block_size,
        accuracy_level=a.accuracy_level,
        overwrite=a.overwrite,
    )
    print(format_onnx_export(r))
    return 0


def harness_command(a: argparse.Namespace) -> int:
    import llmopt.harness as h

    if a.json:
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
        write_json(a.json, r)
    return 0


def push_command(a: argparse.Namespace) -> int:
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


def recipes_command(a: argparse.Namespace) -> int:
    from llmopt.recipe import recipe_summary, shipped_recipes

    print(format_recipes({name: recipe_summary(path) for name, path in shipped_recipes().items()}))
    return 0
