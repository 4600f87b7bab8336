"""``llmopt compress ... --export gguf,onnx --eval --harness T --push-to-hub R``: the whole user loop.

Data moves forward only: input model → recipe stages (:func:`llmopt.compression.compress`) → the saved
HF folder → exporters (GGUF file, ONNX folder, written into the same folder) → with ``--eval``, llama.cpp's
own quantization of the input at the recipe's file type with an importance matrix from the same calibration
windows (the baseline row) → every artifact evaluated on the same token windows against the input model
(perplexity, KL, top-1 agreement, size, bits per weight, prefill/decode tok/s) → lm-eval tasks per artifact →
``report.json``, ``report.md``, ``report.png`` and the model card ``README.md`` → optionally the Hub.

Finished work is never lost. What can be checked is checked before any work (the exports can hold the
recipe's formats, the harness tasks exist, the data is readable). The compression writes OUTPUT atomically;
then every later step writes its files atomically into it and is recorded in ``pipeline.json``
(:mod:`llmopt.pipeline.steps`). A step that fails or is interrupted leaves the compressed model and every
finished artifact; ``--resume`` reruns only what is missing. The push comes last, from the finished folder.

Layout of OUTPUT::

    config.json, model*.safetensors, tokenizer*, recipe.yaml, llmopt_report.json[, quantization.*]
    model.gguf                  --export gguf (stored codes when the recipe quantized onto a GGUF format)
    onnx/                       --export onnx (MatMulNBits from the stored codes when they map exactly)
    baseline/                   --eval: llama.cpp's own quantization of the input (never pushed)
    eval/<artifact>.json        `llmopt eval --json` results (input, transformers, gguf, onnx, baseline)
    harness/<artifact>.json     `llmopt harness --json` results
    pipeline.json               the steps done after the compression (what --resume skips)
    report.json, report.md, report.png, README.md
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from llmopt.errors import LLMOptError
from llmopt.parallel import main_process
from llmopt.pipeline.options import CARD, PipelineOptions, baseline_type, check_recipe
from llmopt.pipeline.steps import StepLog, baseline, evaluate_one, export, harness_one

log = logging.getLogger(__name__)


def run_pipeline(
    model: str,
    recipe,
    output: str | Path,
    opts: PipelineOptions,
    *,
    overwrite: bool = False,
    resume: bool = False,
    compress_kwargs: dict | None = None,
    progress: bool = True,
) -> dict:
    """Compress, export, evaluate, report, card (and push): see the module docstring. Returns report.json.

    Everything that can be checked is checked before any work (:func:`check_recipe`). Each step writes its
    files atomically and is recorded in ``pipeline.json``; a step that fails after the compression keeps the
    compressed model and every artifact already made, and ``resume=True`` (``--resume``) does only what is
    missing (an output compressed with another model or recipe is refused)."""
    from llmopt.compression import REPORT_FILE, compress
    from llmopt.recipe import parse_recipe, recipe_to_yaml

    rec = recipe if not isinstance(recipe, str | Path | dict) else parse_recipe(recipe)
    opts = opts.with_recipe(rec)
    opts.check()
    check_recipe(rec, opts)
    out = Path(output)
    t0 = time.perf_counter()
    state = StepLog.load(out, model, recipe_to_yaml(rec)) if resume else None
    resumed = state is not None
    if state is None:
        if resume and out.exists() and not overwrite:
            raise LLMOptError(
                f"--resume: {out} holds no finished compression (no {REPORT_FILE}); rerun with --overwrite to "
                "replace it, or give another --output"
            )
        # distill checkpoints beside the output, so a rerun with --resume finds them; compress() writes the
        # folder atomically (checked before loading: no existing output unless overwrite)
        kw = {"checkpoint_dir": out.parent / f"{out.name}.ckpt", **(compress_kwargs or {})}
        res = compress(model, rec, out, overwrite=overwrite, resume=resume, **kw)
        if not main_process():  # torchrun: the others helped compress; process 0 wrote it and goes on alone
            return res.report
        state = StepLog(out, model, recipe_to_yaml(rec))
        state.seconds["compress"] = res.report["total_seconds"]
        state.save()
    else:
        log.info("--resume: %s holds the finished compression; doing only what is missing", out)
    compress_report = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    artifacts: dict[str, dict] = {"transformers": {"path": ".", "spec": str(out), "backend": "torch"}}
    for target in opts.export:
        artifacts[target] = state.step(f"export_{target}", lambda t=target: export(t, out, opts))
    btype = baseline_type(rec) if opts.eval and opts.baseline else None
    if btype:
        artifacts["baseline"] = state.step("baseline", lambda: baseline(model, rec, btype, out, opts))
    evals: dict[str, dict] = {}
    if opts.eval:
        (out / "eval").mkdir(exist_ok=True)
        base = None
        for name in ("input", *artifacts):

            def run(name=name):
                nonlocal base
                if base is None:
                    from llmopt.backends import make_backend

                    base = make_backend("torch", model, threads=opts.threads)
                return evaluate_one(name, base, artifacts.get(name), out, opts, progress)

            evals[name] = state.step(f"eval_{name}", run)
        base = None
    harness: dict[str, dict] = {}
    if opts.harness_tasks:
        (out / "harness").mkdir(exist_ok=True)
        for name, a in artifacts.items():
            if a.get("role") == "baseline":
                continue  # the baseline is a perplexity / KL / speed reference; lm-eval runs on llmopt's artifacts
            harness[name] = state.step(f"harness_{name}", lambda a=a, n=name: harness_one(n, a, out, opts, progress))
    # this run's wall time, plus the compression's when an earlier run did it (--resume)
    earlier = state.seconds.get("compress", 0) if resumed else 0
    seconds = {**state.seconds, "total": round(earlier + time.perf_counter() - t0, 2)}
    from llmopt.hub.card import build_card
    from llmopt.outputs import write_text
    from llmopt.pipeline.report import build_report, write_report_files

    report = build_report(model, rec, compress_report, artifacts, evals, harness, opts, seconds, out, out.name)
    write_report_files(report, out)
    write_text(out / CARD, str(build_card(out, opts.push_to_hub or None, local_path=out)))
    log.info("saved %s", out)
    if opts.push_to_hub:
        from llmopt.hub.push import push

        report["push"] = push(out, opts.push_to_hub, private=opts.private)
    return report
