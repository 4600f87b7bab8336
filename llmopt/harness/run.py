"""``llmopt.harness``: lm-evaluation-harness tasks (``lm_eval.simple_evaluate``) on torch, llama.cpp or
ONNX Runtime, with results shaped into one JSON-ready dict.

Order of work: arguments, the model spec (its tokenizer: a bad path fails here), the tasks (names,
include path, Hub reachability, then their data), and only then the weights; so every input error is a
one-line :class:`LLMOptError` before minutes of loading.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llmopt.errors import LLMOptError

log = logging.getLogger(__name__)

RESULT_KIND = "lm-eval-harness"  # marks the JSON for readers (the model card)
_LL_TYPES = ("loglikelihood", "multiple_choice")


def harness(
    model,
    tasks: str | Sequence[str],
    *,
    include_path: str | Path | Sequence[str | Path] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    backend: str = "auto",
    max_length: int | None = None,
    threads: int | None = None,
    device: str | None = None,
    kv_cache: str = "f16",
    documents: bool = False,
    progress: bool = True,
) -> dict:
    """Run lm-eval tasks on ``model`` and return their metrics.

    Args:
        model: a model spec (``bundled:smollm2``, a Hub id, an HF folder, a ``.gguf`` file, an ONNX folder
            from ``llmopt export --to onnx``) or a :class:`~llmopt.models.LoadedModel`.
        tasks: lm-eval task, group or tag names (``"arc_easy,hellaswag"`` or a list).
        include_path: folder(s) of task YAMLs, as lm-eval's ``--include_path``.
        limit: at most this many documents per task (a float below 1: that fraction).
        num_fewshot: few-shot examples (None: each task's own default, else 0).
        batch_size: sequences per forward for torch (HFLM); llama.cpp and ONNX Runtime score one at a time.
        backend: ``auto`` (``.gguf`` → gguf, ONNX folder → onnx, else torch), ``torch``, ``gguf``, ``onnx``.
        max_length: context window in tokens (None: the model's, as HFLM resolves it).
        threads: threads for every backend (None: physical cores).
        device: torch device (``cuda``); torch only.
        kv_cache: llama.cpp's KV cache format, ``f16`` (its default) or ``f32`` (an F32 GGUF then matches
            torch's per-document log-likelihoods to ~1e-4); gguf only.
        documents: also return per-document log-likelihoods (and generations).

    Returns:
        ``{"kind", "model", "backend", "tasks": {name: {"output_type", "num_fewshot", "n_samples",
        "n_documents", "dataset", "metrics": {metric: {"value", "stderr"}}, "higher_is_better",
        ["documents"]}}, "groups", "max_length", "tokens", ...}``. Rolling log-likelihood tasks also get
        ``token_perplexity`` = exp(−Σ log-likelihood / Σ tokens scored) and ``tokens_scored``.
    """
    t0 = time.perf_counter()
    from llmopt.backends import backend_kind, resolve_threads
    from llmopt.harness.tasks import check_include_paths, load_tasks, parse_task_names, resolve_tasks
    from llmopt.models import LoadedModel

    names = parse_task_names(tasks)
    _check_numbers(limit, num_fewshot, batch_size, max_length)
    threads = resolve_threads(threads)
    include = check_include_paths(include_path)
    spec = model.spec if isinstance(model, LoadedModel) else model
    if not isinstance(spec, str):
        raise LLMOptError(f"model must be a model spec or a LoadedModel, got {type(model).__name__}")
    kind = "torch" if isinstance(model, LoadedModel) else backend_kind(backend, spec)
    if isinstance(model, LoadedModel) and backend not in ("auto", "torch"):
        raise LLMOptError(f"a LoadedModel runs on torch; pass a model spec for backend '{backend}'")
    if kind not in ("torch", "gguf", "onnx"):
        raise LLMOptError(f"unknown backend '{backend}'; valid backends: auto, torch, gguf, onnx")
    if device not in (None, "cpu") and kind != "torch":
        raise LLMOptError(f"the {kind} backend runs on the CPU here; drop device or use backend='torch'")
    if kv_cache != "f16" and kind != "gguf":
        raise LLMOptError(f"--kv-cache is a llama.cpp option (a .gguf model); the {kind} backend has none")
    tokenizer = None
    if not isinstance(model, LoadedModel):
        from llmopt.models import load_tokenizer

        tokenizer = load_tokenizer(spec)  # a missing path, a non-model file, a folder without config.json

    import lm_eval
    from lm_eval import simple_evaluate

    with _quiet_lm_eval():
        tm, specs = resolve_tasks(names, include)
        task_objs = load_tasks(tm, specs)
        if kind == "torch":
            lm = _torch_lm(model, batch_size, max_length, threads, device)
        else:
            lm = _backend_lm(kind, spec, tokenizer, max_length, threads, kv_cache, progress)
        try:
            out = simple_evaluate(
                model=lm,
                tasks=task_objs,
                task_manager=tm,
                limit=limit,
                num_fewshot=num_fewshot,
                batch_size=batch_size,
                log_samples=True,  # per-document results (token perplexity, documents=True)
            )
            result = shape_results(out, lm, documents=documents)
        finally:
            engine = getattr(lm, "engine", None)
            if engine is not None:
                engine.close()
    result.update(
        kind=RESULT_KIND,
        lm_eval_version=lm_eval.__version__,
        model=spec,
        backend=kind,
        tasks_requested=names,
        include_path=[str(p) for p in include],
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size if kind == "torch" else 1,
        threads=threads,
        kv_cache=kv_cache if kind == "gguf" else None,
        seconds=round(time.perf_counter() - t0, 2),
    )
    return result


def _check_numbers(limit, num_fewshot, batch_size, max_length) -> None:
    def whole(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0):
        raise LLMOptError(f"--limit must be > 0 (documents, or a fraction below 1), got {limit!r}")
    if isinstance(limit, float) and limit >= 1 and not limit.is_integer():
        raise LLMOptError(f"--limit {limit}: a fraction must be below 1, a count a whole number")
    if num_fewshot is not None and (not whole(num_fewshot) or num_fewshot < 0):
        raise LLMOptError(f"--num-fewshot must be a whole number >= 0, got {num_fewshot!r}")
    if not whole(batch_size) or batch_size < 1:
        raise LLMOptError(f"--batch-size must be a whole number >= 1, got {batch_size!r}")
    if max_length is not None and (not whole(max_length) or max_length < 2):
        raise LLMOptError(f"--max-length must be a whole number >= 2, got {max_length!r}")


def _backend_lm(kind: str, spec: str, tokenizer, max_length: int | None, threads: int, kv_cache: str, progress):
    if kind == "gguf":
        from llmopt.harness.llamacpp_lm import LlamaCppLM

        return LlamaCppLM.from_spec(
            spec, tokenizer=tokenizer, threads=threads, max_length=max_length, kv_type=kv_cache, progress=progress
        )
    from llmopt.harness.onnx_lm import OnnxLM

    return OnnxLM.from_spec(spec, tokenizer=tokenizer, threads=threads, max_length=max_length, progress=progress)


def _torch_lm(model, batch_size: int, max_length: int | None, threads: int, device: str | None):
    from llmopt.harness.torch_lm import torch_lm
    from llmopt.models import LoadedModel, load_model

    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    return torch_lm(loaded, batch_size=batch_size, max_length=max_length, threads=threads)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs warnings meant for its own CLI (e.g. "`pretrained` model kwarg is not of type str"
    for every pre-loaded model); they are shown only when llmopt logs at INFO (``-v``). Its
    ``git describe`` of the current folder (``results["git_hash"]``, about lm-eval's own checkout) is
    skipped: outside a repository it prints "fatal: not a git repository" to stderr."""
    from unittest import mock

    import lm_eval.evaluator

    lm_log = logging.getLogger("lm_eval")
    old = lm_log.level
    if not log.isEnabledFor(logging.INFO):
        lm_log.setLevel(logging.ERROR)
    try:
        with mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None):
            yield
    finally:
        lm_log.setLevel(old)


# ------------------------------------------------------------------ results
def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" for stderrs it does not compute
    return v if math.isfinite(v) else None


def _metrics(res: dict) -> dict[str, dict]:
    """``{"acc,none": v, "acc_stderr,none": s}`` → ``{"acc": {"value": v, "stderr": s}}`` (other filters
    keep their name: ``"exact_match,strict-match"``)."""
    out = {}
    for key, value in res.items():
        if "," not in key or key.split(",", 1)[0].endswith("_stderr"):
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else key
        out[name] = {"value": _num(value), "stderr": _num(res.get(f"{metric}_stderr,{filt}"))}
    return out


def shape_results(out: dict, lm, documents: bool = False) -> dict:
    """lm-eval's ``simple_evaluate`` output → llmopt's result dict (JSON-ready, no samples unless asked)."""
    tasks = {}
    for name, res in out["results"].items():
        if name in out.get("groups", {}):
            continue
        cfg = out["configs"].get(name, {})
        n = out["n-samples"].get(name, {})
        entry: dict[str, Any] = {
            "output_type": cfg.get("output_type"),
            "num_fewshot": out.get("n-shot", {}).get(name),
            "n_samples": n.get("effective"),
            "n_documents": n.get("original"),
            "dataset": {"path": cfg.get("dataset_path"), "name": cfg.get("dataset_name")},
            "metrics": _metrics(res),
            "higher_is_better": out.get("higher_is_better", {}).get(name, {}),
        }
        docs = [_document(s, entry["output_type"], lm) for s in out.get("samples", {}).get(name, [])]
        if entry["output_type"] == "loglikelihood_rolling" and docs:
            ll, toks = sum(d["loglikelihood"] for d in docs), sum(d["tokens"] for d in docs)
            entry["metrics"]["token_perplexity"] = {"value": _num(math.exp(-ll / toks)), "stderr": None}
            entry["higher_is_better"] = {**entry["higher_is_better"], "token_perplexity": False}
            entry["tokens_scored"] = toks
        if documents:
            entry["documents"] = docs
        tasks[name] = entry
    groups = {name: {"metrics": _metrics(res)} for name, res in out.get("groups", {}).items()}
    tok = lm.tokenizer
    bos, plain = tok.bos_token_id, tok.encode("a b", add_special_tokens=False)
    adds_bos = bos is not None and tok.encode("a b")[:1] == [bos] and plain[:1] != [bos]
    return {
        "tasks": tasks,
        "groups": groups,
        "max_length": int(lm.max_length),
        "tokens": {
            "adds_bos": adds_bos,  # the tokenizer's own rule, followed by every backend here
            "prefix_token_id": lm.prefix_token_id,
            "eot_token_id": lm.eot_token_id,
        },
    }


def _document(s: dict, output_type: str | None, lm) -> dict:
    """One logged sample → ``{"doc_id", "target", ...}``: per-choice log-likelihoods, a rolling
    log-likelihood with its token count, or a generation; plus the sample's scalar metric values."""
    d: dict[str, Any] = {"doc_id": s["doc_id"]}
    if output_type != "loglikelihood_rolling":  # a rolling task's target is the whole document
        d["target"] = s.get("target")
    resps = s.get("filtered_resps", [])
    if output_type in _LL_TYPES:
        d["loglikelihoods"] = [float(r[0]) for r in resps]
        d["is_greedy"] = [bool(r[1]) for r in resps]
    elif output_type == "loglikelihood_rolling":
        d["loglikelihood"] = float(resps[0])
        d["tokens"] = len(lm.tok_encode(s["arguments"][0][0]))  # every token is predicted once
    else:
        d["generation"] = resps[0] if resps else None
    for m in s.get("metrics", []):
        if _num(s.get(m)) is not None:
            d[m] = float(s[m])
    return d


def format_harness(r: dict) -> str:
    """A table for the terminal: task, metric, value ± stderr, documents."""
    rows = [("task", "metric", "value", "± stderr", "n")]
    for name, t in r["tasks"].items():
        for metric, m in t["metrics"].items():
            err = "" if m["stderr"] is None else f"{m['stderr']:.4f}"
            rows.append((name, metric, _fmt(m["value"]), err, str(t["n_samples"])))
    for name, g in r.get("groups", {}).items():
        for metric, m in g["metrics"].items():
            err = "" if m["stderr"] is None else f"{m['stderr']:.4f}"
            rows.append((f"{name} (group)", metric, _fmt(m["value"]), err, ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [f"model {r['model']} ({r['backend']}, max_length {r['max_length']}, lm-eval {r['lm_eval_version']})"]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
