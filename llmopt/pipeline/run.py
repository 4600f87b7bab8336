"""``llmopt compress ... --export gguf,onnx --eval --harness T --push-to-hub R``: the whole user loop.

Data moves forward only: input model → recipe stages (:func:`llmopt.compression.compress`) → the saved
HF folder → exporters (GGUF file, ONNX folder, written into the same folder) → every artifact evaluated on
the same token windows against the input model (perplexity, KL, top-1 agreement, size, bits per weight,
prefill/decode tok/s) → lm-eval tasks per artifact → ``report.json``, ``report.md``, ``report.png`` and the
model card ``README.md`` → optionally the Hub.

The whole folder is built in a temporary sibling and renamed into place only when everything but the
push succeeded: an interrupted or failed run leaves the previous output (or nothing) and can be rerun.
The push comes last, from the finished folder, so a failed upload never loses the local result.

Layout of OUTPUT::

    config.json, model*.safetensors, tokenizer*, recipe.yaml, llmopt_report.json[, quantization.*]
    model.gguf                  --export gguf (stored codes when the recipe quantized onto a GGUF format)
    onnx/                       --export onnx (MatMulNBits from the stored codes when they map exactly)
    eval/<artifact>.json        `llmopt eval --json` results (input, transformers, gguf, onnx)
    harness/<artifact>.json     `llmopt harness --json` results
    report.json, report.md, report.png, README.md
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmopt.errors import LLMOptError

log = logging.getLogger(__name__)

EXPORTS = ("gguf", "onnx")
GGUF_NAME = "model.gguf"
ONNX_DIR = "onnx"
REPORT_JSON, REPORT_MD, REPORT_PNG, CARD = "report.json", "report.md", "report.png", "README.md"


@dataclass
class PipelineOptions:
    """What happens after the recipe's stages. Validated once by :meth:`check`, before any model loads."""

    export: tuple[str, ...] = ()
    eval: bool = False
    # None: the recipe's ``evaluation`` section (see :meth:`with_recipe`)
    eval_data: str | None = None
    eval_seq_len: int | None = None
    eval_windows: int | None = None
    speed: bool = True
    threads: int | None = None
    harness_tasks: str | None = None
    harness_include_path: str | None = None
    harness_limit: int | float | None = None
    push_to_hub: str | None = None
    private: bool = False
    gguf_type: str = "auto"
    onnx_quant: str = "auto"
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse_exports(cls, text: str | None) -> tuple[str, ...]:
        if not text:
            return ()
        parts = [p.strip().lower() for p in text.split(",") if p.strip()]
        bad = [p for p in parts if p not in EXPORTS]
        if bad:
            raise LLMOptError(f"unknown --export target {bad[0]!r}; valid: {', '.join(EXPORTS)} (comma-separated)")
        return tuple(dict.fromkeys(parts))

    def with_recipe(self, recipe) -> PipelineOptions:
        """These options with the evaluation settings the command line left open taken from the recipe's
        ``evaluation`` section (a recipe without one: wikitext2, 8 windows of 2048 tokens)."""
        from dataclasses import replace

        ev = getattr(recipe, "evaluation", None)
        return replace(
            self,
            eval_data=self.eval_data or (ev.data if ev else "wikitext2"),
            eval_seq_len=self.eval_seq_len or (ev.seq_len if ev else 2048),
            eval_windows=self.eval_windows if self.eval_windows is not None else (ev.windows if ev else 8),
        )

    def check(self) -> None:
        if self.eval_data is None or self.eval_seq_len is None:
            raise LLMOptError("internal: PipelineOptions.check() before with_recipe()")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise LLMOptError(f"--eval-windows must be >= 1, got {self.eval_windows}")
        if self.eval_seq_len < 16:
            raise LLMOptError(f"--eval-seq-len must be >= 16, got {self.eval_seq_len}")
        if self.harness_include_path and not Path(self.harness_include_path).is_dir():
            raise LLMOptError(f"--harness-include-path {self.harness_include_path} is not a folder of task YAMLs")
        if self.push_to_hub:
            from llmopt.hub.push import check_repo_id

            check_repo_id(self.push_to_hub)
        if self.eval:
            from llmopt.data import load_text, parse_data_spec

            load_text(parse_data_spec(self.eval_data), role="eval")  # offline / missing file: fail now


def model_parameter_count(spec: str) -> int | None:
    """Parameters of a model spec from file headers only (no weights read): a local HF folder's
    safetensors headers, a GGUF's tensor table (``bundled:`` included); None for a Hub id."""
    import math as _math

    try:
        p = Path(spec)
        if spec.startswith("bundled:") or (p.is_file() and p.suffix == ".gguf"):
            from gguf import GGUFReader

            from llmopt.models import bundled_gguf_path

            path = bundled_gguf_path(spec.split(":", 1)[1]) if spec.startswith("bundled:") else str(p)
            return int(sum(int(_math.prod(int(d) for d in t.shape)) for t in GGUFReader(path).tensors))
        if p.is_dir():
            from llmopt.checkpoint import check_weights

            return int(sum(_math.prod(shape) for _dtype, shape in check_weights(p).values()))
    except (LLMOptError, OSError, ValueError):
        return None
    return None


def estimate_seconds(n_params: int, recipe, opts: PipelineOptions) -> float:
    """A rough duration, scaled from this project's measurements on the embedded model (SmolLM2-135M,
    2 CPU cores): a GPTQ/SparseGPT pass over 32 x 512 calibration tokens ~150 s, distillation at ~80 tokens/s
    up to its wall-clock budget, a GGUF export ~10 s, an
    ONNX export ~40 s, one backend's evaluation of 8 x 2048 tokens with speed ~60 s (with the base)."""
    scale = n_params / 135e6
    cal = recipe.calibration
    tokens = cal.samples * cal.seq_len / (32 * 512)
    s = 10.0
    for st in recipe.stages:
        name = st.stage
        if name in ("gptq", "sparsegpt", "wanda"):
            s += 150 * scale * tokens
        elif name in ("rtn", "magnitude"):
            s += 5 * scale
        elif name == "structured":
            s += 30 * scale * tokens  # one forward pass with importance hooks
        elif name == "distill":  # ~80 (QAT) to ~110 trained tokens/s; teacher top-k ~1.4 s per 512 tokens, cached
            train = st.max_tokens * scale / 80
            if st.max_minutes:
                train = min(train, 60 * st.max_minutes)
            s += train + min(st.max_tokens / 512, 240) * 1.4 * scale
    s += (10 * ("gguf" in opts.export) + 40 * ("onnx" in opts.export)) * scale
    if opts.eval:
        windows = (opts.eval_windows or 32) * opts.eval_seq_len / (8 * 2048)
        s += (2 + len(opts.export)) * 60 * scale * windows
    if opts.harness_tasks:
        s += (1 + len(opts.export)) * 60 * scale
    return s


def run_pipeline(
    model: str,
    recipe,
    output: str | Path,
    opts: PipelineOptions,
    *,
    overwrite: bool = False,
    compress_kwargs: dict | None = None,
    progress: bool = True,
) -> dict:
    """Compress, export, evaluate, report, card (and push): see the module docstring. Returns report.json."""
    from llmopt.compression import compress
    from llmopt.outputs import atomic_output, preflight
    from llmopt.recipe import parse_recipe

    rec = recipe if not isinstance(recipe, str | Path | dict) else parse_recipe(recipe)
    opts = opts.with_recipe(rec)
    opts.check()
    out = preflight(output, overwrite=overwrite, kind="folder")
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    with atomic_output(out, overwrite=overwrite, kind="folder") as tmp:
        # compress() writes its own folder atomically: here into the (empty) temporary sibling
        # distill checkpoints beside the final output, so a rerun with --resume finds them
        kw = {"checkpoint_dir": out.parent / f"{out.name}.ckpt", **(compress_kwargs or {})}
        res = compress(model, rec, tmp, overwrite=True, **kw)
        seconds["compress"] = res.report["total_seconds"]
        artifacts: dict[str, dict] = {"transformers": {"path": ".", "spec": str(tmp), "backend": "torch"}}
        for target in opts.export:
            t = time.perf_counter()
            artifacts[target] = _export(target, tmp, opts)
            seconds[f"export_{target}"] = round(time.perf_counter() - t, 2)
        evals: dict[str, dict] = {}
        if opts.eval:
            t = time.perf_counter()
            evals = _evaluate_all(model, tmp, artifacts, opts, progress)
            seconds["eval"] = round(time.perf_counter() - t, 2)
        harness: dict[str, dict] = {}
        if opts.harness_tasks:
            t = time.perf_counter()
            harness = _harness_all(tmp, artifacts, opts, progress)
            seconds["harness"] = round(time.perf_counter() - t, 2)
        seconds["total"] = round(time.perf_counter() - t0, 2)
        from llmopt.pipeline.report import build_report, write_report_files

        report = build_report(model, rec, res.report, artifacts, evals, harness, opts, seconds, tmp, out.name)
        write_report_files(report, tmp)
        from llmopt.hub.card import build_card

        build_card(tmp, opts.push_to_hub or None, local_path=out).save(tmp / CARD)
    log.info("saved %s", out)
    if opts.push_to_hub:
        from llmopt.hub.push import push

        report["push"] = push(out, opts.push_to_hub, private=opts.private)
    return report


def _export(target: str, folder: Path, opts: PipelineOptions) -> dict:
    from llmopt.exporters import export_gguf, export_onnx

    quantized = (folder / "quantization.json").is_file()
    if target == "gguf":
        r = export_gguf(str(folder), str(folder / GGUF_NAME), type=opts.gguf_type, overwrite=True)
        return {"path": GGUF_NAME, "spec": str(folder / GGUF_NAME), "backend": "gguf", "export": _plain(r)}
    quant = opts.onnx_quant if (quantized or opts.onnx_quant != "auto") else "none"
    r = export_onnx(str(folder), str(folder / ONNX_DIR), quant=quant, overwrite=True)
    return {"path": ONNX_DIR, "spec": str(folder / ONNX_DIR), "backend": "onnx", "export": _plain(r)}


def _plain(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, str | int | float | bool | type(None) | dict | list)}


def _evaluate_all(model: str, folder: Path, artifacts: dict, opts: PipelineOptions, progress: bool) -> dict:
    """Every artifact and the input model on the same windows; KL against the input model (torch)."""
    from llmopt.backends import make_backend
    from llmopt.evaluation import evaluate
    from llmopt.outputs import write_text

    (folder / "eval").mkdir(exist_ok=True)
    base = make_backend("torch", model, threads=opts.threads)
    kw = dict(
        data=opts.eval_data,
        seq_len=opts.eval_seq_len,
        max_windows=opts.eval_windows,
        speed=opts.speed,
        threads=opts.threads,
        progress=progress,
    )
    out = {}
    r = evaluate(base, **kw)
    out["input"] = r.to_dict()
    for name, a in artifacts.items():
        r = evaluate(a["spec"], base=base, backend=a["backend"], **kw)
        out[name] = r.to_dict()
    for name, d in out.items():
        d = {**d, "model": "input model" if name == "input" else artifacts[name]["path"]}
        out[name] = d
        write_text(folder / "eval" / f"{name}.json", json.dumps(d, indent=1))
    return out


def _harness_all(folder: Path, artifacts: dict, opts: PipelineOptions, progress: bool) -> dict:
    import llmopt.harness as h
    from llmopt.outputs import write_text

    (folder / "harness").mkdir(exist_ok=True)
    out = {}
    for name, a in artifacts.items():
        r = h.harness(
            a["spec"],
            opts.harness_tasks,
            include_path=opts.harness_include_path,
            limit=opts.harness_limit,
            backend=a["backend"],
            threads=opts.threads,
            progress=progress,
        )
        r = {**r, "model": a["path"]}
        out[name] = r
        write_text(folder / "harness" / f"{name}.json", json.dumps(r, indent=1))
    return out
