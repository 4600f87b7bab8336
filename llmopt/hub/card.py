"""The model card of an llmopt output folder, as a ``huggingface_hub.ModelCard``.

Everything comes from the folder itself: ``llmopt_report.json`` (source model, stages, sparsity, bits per
weight, calibration), ``recipe.yaml``, the JSON results ``llmopt eval --json`` wrote anywhere in it, and the
artifacts present (safetensors for transformers, ``*.gguf`` files, ONNX folders), and the JSON results
``llmopt harness --json`` wrote in it (lm-evaluation-harness tasks). The metadata (YAML front
matter) is built with ``ModelCardData``: ``base_model`` (when the source was a Hub id or ``bundled:``),
``base_model_relation``, ``library_name``, ``tags``, ``pipeline_tag``, calibration ``datasets`` and a
``model-index`` with the perplexity / KL measured on Hub data sets. The text is written here, no template engine;
the folder is read by :mod:`llmopt.hub.artifacts`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from llmopt.hub.artifacts import (
    BASELINE_DIR,
    HUB_ID,
    README,
    Artifacts,
    dataset_of,
    hub_base_model,
    read_json,
    scan,
)

__all__ = ["BASELINE_DIR", "README", "Artifacts", "build_card", "card_data", "hub_base_model", "scan"]


def _calibration_datasets(report: dict | None) -> list[str]:
    if not report:
        return []
    data = (report.get("recipe") or {}).get("calibration", {}).get("data", "")
    ds = dataset_of(data)[0] if data else None
    return [ds] if ds else []


def _stage_kinds(report: dict | None) -> tuple[list[str], bool, bool]:
    """(stage names, pruned?, quantized?): a pruning stage's config has ``sparsity``, a quantization
    stage reports ``bits_per_weight`` (its own zeros from rounding are not pruning)."""
    configs = ((report or {}).get("recipe") or {}).get("stages") or []
    names, pruned, quantized = [], False, False
    for key, s in (report or {}).get("stages", {}).items():
        i, name = key.split(":", 1)
        names.append(name)
        cfg = configs[int(i)] if i.isdigit() and int(i) < len(configs) else {}
        pruned |= "sparsity" in cfg and "bits_per_weight" not in s
        quantized |= "bits_per_weight" in s
    for key in (report or {}).get("model_stages", {}):  # whole-model stages: structured, distill
        name = key.split(":", 1)[1]
        names.append(name)
        pruned |= name == "structured"
    return names, pruned, quantized


def card_data(a: Artifacts, name: str, base_model: str | None = None) -> ModelCardData:
    source = (a.report or {}).get("model")
    base = base_model or hub_base_model(source)
    names, pruned, quantized = _stage_kinds(a.report)
    tags = ["llmopt"]
    if pruned:
        sparse = any(n in ("sparsegpt", "wanda", "magnitude") for n in names)  # structured pruning stays dense
        tags += ["sparse", "pruned"] if sparse else ["pruned"]
    if quantized:
        tags += ["quantized"]
    tags += [n for n in names if n in ("sparsegpt", "wanda", "gptq")]
    tags += [t for n, t in (("structured", "structured-pruning"), ("distill", "distillation")) if n in names]
    if a.ggufs:
        tags.append("gguf")
    if a.onnx_dirs:
        tags.append("onnx")
    # The Hub knows adapter / merge / quantized / finetune; a pruned-only model is listed as a finetune.
    relation = "quantized" if quantized else "finetune" if pruned else None
    library = "transformers" if a.transformers else "gguf" if a.ggufs else "onnx" if a.onnx_dirs else None
    results = []
    for rel, r in a.evals:
        if _is_input_eval(a, rel, r) or _is_baseline_eval(r):  # reference rows are not this model's results
            continue
        ds_id, ds_name, config, split = dataset_of(str(r["data"]))
        if ds_id is None:  # local data: the card's table only (as harness tasks on local data)
            continue
        what = f"{r['backend']}, {r['seq_len']}-token windows x {r['windows']}"
        metrics = [("perplexity", f"Perplexity ({what})", r["perplexity"])]
        if r.get("kl"):
            metrics.append(("kl_divergence", f"KL divergence vs base, mean ({what})", r["kl"]["mean"]))
        for metric, label, value in metrics:
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Text Generation",
                    dataset_type=ds_id,
                    dataset_name=ds_name,
                    dataset_config=config,
                    dataset_split=split,
                    metric_type=metric,
                    metric_name=label,
                    metric_value=round(float(value), 4),
                )
            )
    results += _harness_results(a)
    return ModelCardData(
        base_model=base,
        base_model_relation=relation if base else None,
        library_name=library,
        pipeline_tag="text-generation",
        tags=tags,
        datasets=_calibration_datasets(a.report) or None,
        model_name=name,
        eval_results=results or None,
    )


def _fmt(x, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _summary_lines(a: Artifacts, base: str | None) -> list[str]:
    r = a.report
    if not r:
        return ["A model folder pushed with llmopt (no `llmopt_report.json`: not made by `llmopt compress`)."]
    recipe = r.get("recipe") or {}
    src = f"[{base}](https://huggingface.co/{base})" if base else f"`{r.get('model')}`"
    lines = [f"`{recipe.get('name') or 'custom recipe'}` applied to {src} with llmopt.", "", "| | |", "|---|---|"]
    desc = _shipped_summary(recipe.get("name"))
    if desc:
        lines.append(f"| Recipe | `{recipe.get('name')}`: {desc} |")
    for key, s in r.get("stages", {}).items():
        i, name = key.split(":", 1)
        parts = [f"{s.get('linears', '?')} Linears"]
        if "bits_per_weight" in s:
            parts.append(f"{s['bits_per_weight']:.3f} bits/weight")
            if s.get("sparsity", 0) >= 0.01:
                parts.append(f"zeros {100 * s['sparsity']:.2f}%")
        elif "sparsity" in s:
            parts.append(f"sparsity {100 * s['sparsity']:.2f}%")
        lines.append(f"| Stage {int(i) + 1}: {name} | {', '.join(parts)} |")
    names, _, _ = _stage_kinds(r)
    cal = recipe.get("calibration") or {}
    if cal and any(n in ("sparsegpt", "wanda", "gptq") for n in names):
        lines.append(
            f"| Calibration | {cal.get('samples')} x {cal.get('seq_len')} tokens of `{cal.get('data')}`, "
            f"seed {cal.get('seed')}, true-sequential {str(r.get('true_sequential', False)).lower()} |"
        )
    lines.append(f"| dtype | {r.get('dtype')} |")
    if "compress_seconds" in r:
        lines.append(
            f"| Compression time | {r['compress_seconds']:.1f} s, peak RSS {r.get('peak_rss_mib', 0):.0f} MiB |"
        )
    return lines


def _shipped_summary(name: str | None) -> str:
    if not name:
        return ""
    from llmopt.recipe import recipe_summary, shipped_recipes

    p = shipped_recipes().get(name)
    return recipe_summary(p) if p else ""


def _is_input_eval(a: Artifacts, rel: str, r: dict) -> bool:
    """An evaluation of the input model (``llmopt compress --eval`` writes it as eval/input.json)."""
    return rel == "eval/input.json" or r.get("model") == "input model"


def _is_baseline_eval(r: dict) -> bool:
    """An evaluation of the baseline (llama.cpp's own quantization of the input, ``baseline/``)."""
    return str(r.get("model", "")).startswith(BASELINE_DIR + "/")


def _eval_table(a: Artifacts) -> list[str]:
    if not a.evals:
        if a.harness:
            return []
        return ["No evaluation results in the folder (`llmopt eval DIR --json DIR/eval.json` adds them)."]
    lines = [
        "| artifact | backend | data | windows x seq_len | perplexity | base perplexity | KL mean | KL p99 "
        "| top-1 agreement | prefill tok/s | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rel, r in a.evals:
        model = str(r.get("model", ""))
        artifact = Path(model).name if model.endswith(".gguf") else "ONNX" if r["backend"] == "onnx" else "model"
        if _is_input_eval(a, rel, r):
            artifact = "input model (reference)"
        elif _is_baseline_eval(r):
            artifact = f"{Path(model).stem} (baseline: llama.cpp's own quantizer)"
        kl, sp = r.get("kl") or {}, r.get("speed") or {}
        top1 = kl.get("top1_agreement")
        lines.append(
            f"| {artifact} | {r['backend']} | `{r['data']}` | {r['windows']} x {r['seq_len']} "
            f"| {_fmt(r['perplexity'])} | {_fmt(kl.get('base_perplexity'))} "
            f"| {_fmt(kl.get('mean'), '.4f')} | {_fmt(kl.get('p99'), '.4f')} "
            f"| {'—' if top1 is None else f'{100 * top1:.2f}%'} "
            f"| {_fmt(sp.get('prefill_tok_s'), '.1f')} | {_fmt(sp.get('decode_tok_s'), '.1f')} |"
        )
    threads = {(r.get("speed") or {}).get("threads") for _, r in a.evals} - {None}
    lines += [
        "",
        "Perplexity: non-overlapping windows, each scored on its own (GPTQ-paper protocol); KL(base ‖ model) "
        "per scored token over the whole vocabulary, like llama-perplexity's KL mode"
        + (f"; speed on {', '.join(map(str, sorted(threads)))} threads." if threads else "."),
    ]
    return lines


def _harness_rows(a: Artifacts):
    """(artifact, backend, task name, task, metric, value dict) for every metric with a value."""
    for _, r in a.harness:
        model = str(r.get("model", ""))
        artifact = Path(model).name if model.endswith(".gguf") else "ONNX" if r.get("backend") == "onnx" else "model"
        for name, t in r["tasks"].items():
            for metric, m in (t.get("metrics") or {}).items():
                if isinstance(m, dict) and isinstance(m.get("value"), (int, float)):
                    yield artifact, r.get("backend"), name, t, metric, m


def _harness_results(a: Artifacts) -> list[EvalResult]:
    """model-index entries for harness tasks on Hub data sets (local-data tasks stay in the table only)."""
    out = []
    for _, backend, name, t, metric, m in _harness_rows(a):
        ds = (t.get("dataset") or {}).get("path")
        if not isinstance(ds, str) or not HUB_ID.fullmatch(ds):
            continue
        out.append(
            EvalResult(
                task_type="text-generation",
                task_name=name,
                dataset_type=ds,
                dataset_name=name,
                dataset_config=(t.get("dataset") or {}).get("name"),
                metric_type=metric,
                metric_name=f"{metric} ({t.get('num_fewshot') or 0}-shot, {backend}, lm-evaluation-harness)",
                metric_value=round(float(m["value"]), 4),
            )
        )
    return out


def _harness_table(a: Artifacts) -> list[str]:
    lines = [
        "### lm-evaluation-harness",
        "",
        "| artifact | backend | task | metric | value | ± stderr | n-shot | documents |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for artifact, backend, name, t, metric, m in _harness_rows(a):
        err = m.get("stderr")
        lines.append(
            f"| {artifact} | {backend} | `{name}` | {metric} | {_fmt(m['value'], '.4f')} "
            f"| {_fmt(err, '.4f') if isinstance(err, (int, float)) else '—'} | {t.get('num_fewshot') or 0} "
            f"| {t.get('n_samples', '—')} |"
        )
    versions = sorted({str(r.get("lm_eval_version")) for _, r in a.harness})
    return lines + ["", f"lm-evaluation-harness {', '.join(versions)} through `llmopt harness`."]


def _how_to_run(a: Artifacts, repo_id: str | None, local: str) -> list[str]:
    """Loading from the Hub repo ``repo_id``; from the folder path ``local`` when nothing was pushed (None)."""
    out = ["## How to run", ""]
    where = json.dumps(repo_id or local, ensure_ascii=False)  # a Python string literal
    if a.transformers:
        note = ""
        if a.quantization_codes:
            note = (
                "The safetensors hold the dequantized weights (what the quantized model computes); the integer "
                "codes and scales are in `quantization.safetensors` (`quantization.json` lists the formats).\n\n"
            )
        out += [
            "### transformers",
            "",
            note + "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"tok = AutoTokenizer.from_pretrained({where})",
            f"model = AutoModelForCausalLM.from_pretrained({where})",
            'ids = tok("The capital of France is", return_tensors="pt").input_ids',
            "print(tok.decode(model.generate(ids, max_new_tokens=32)[0]))",
            "```",
            "",
        ]
    if a.ggufs:
        out += ["### llama.cpp", "", "```bash"]
        for rel, size in a.ggufs:
            src = f"--hf-repo {repo_id} --hf-file {rel}" if repo_id else f"-m {shlex.quote(f'{local}/{rel}')}"
            out.append(f'llama-cli {src} -p "The capital of France is"  # {size / 2**20:.1f} MiB')
        out += ["```", ""]
    for d in a.onnx_dirs:
        sub = f', subfolder="{d}"' if d and repo_id else ""
        onnx = where if repo_id or not d else json.dumps(f"{local}/{d}", ensure_ascii=False)
        out += [
            "### ONNX Runtime" + (f" (`{d}/`)" if d else ""),
            "",
            "```python",
            "from optimum.onnxruntime import ORTModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f"tok = AutoTokenizer.from_pretrained({onnx}{sub})",
            f"model = ORTModelForCausalLM.from_pretrained({onnx}{sub})",
            'print(tok.decode(model.generate(**tok("The capital of France is", return_tensors="pt"))[0]))',
            "```",
            "",
        ]
    source = (a.report or {}).get("model")
    source = source if source and (source.startswith("bundled:") or hub_base_model(source)) else None
    if a.transformers:
        get, path = (f"hf download {repo_id} --local-dir model && ", "model") if repo_id else ("", shlex.quote(local))
        out += [
            "### llmopt (perplexity, KL against the base, speed)",
            "",
            "```bash",
            f"{get}llmopt eval {path} --data wikitext2" + (f" --base {source}" if source else ""),
            "```",
        ]
    return out


def build_card(
    folder: str | Path, repo_id: str | None, base_model: str | None = None, *, local_path: str | Path | None = None
) -> ModelCard:
    """The model card (metadata + text) for ``folder`` as it will be published at ``repo_id``.

    ``repo_id`` None: nothing is pushed, "How to run" loads from the folder's path, ``local_path`` (default
    ``folder``; e.g. the final output path when the card is written into its temporary sibling)."""
    a = scan(folder)
    local = str(local_path if local_path is not None else folder)
    name = repo_id.split("/")[-1] if repo_id else Path(local).name
    data = card_data(a, name, base_model)
    base = data.base_model
    lines = [f"# {name}", "", *_summary_lines(a, base), "", "## Evaluation", "", *_eval_table(a)]
    run_report = read_json(Path(folder) / "report.json")
    if isinstance(run_report, dict) and run_report.get("baseline"):
        from llmopt.baseline import baseline_markdown

        lines += ["", *baseline_markdown(run_report)]
        lines += [f"Note: {n}" for n in run_report.get("notes") or []]
    if a.harness:
        lines += ["", *_harness_table(a)]
    lines += ["", *_how_to_run(a, repo_id, local)]
    if a.recipe_yaml:
        lines += ["", "## Recipe", "", "The resolved recipe (`recipe.yaml`), defaults filled in:", "", "```yaml"]
        lines += [a.recipe_yaml.rstrip(), "```"]
    content = "---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines) + "\n"
    return ModelCard(content)
