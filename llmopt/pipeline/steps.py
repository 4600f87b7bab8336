"""The steps after the compression, each writing its files atomically into the output folder, and
``pipeline.json``, the record of which are done (what ``--resume`` skips)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmopt.errors import LLMOptError
from llmopt.pipeline.options import GGUF_NAME, ONNX_DIR, PipelineOptions

log = logging.getLogger(__name__)

PIPELINE_STATE = "pipeline.json"


@dataclass
class StepLog:
    """``pipeline.json``: which steps after the compression are done, and what each returned."""

    folder: Path
    model: str
    recipe_yaml: str
    steps: dict[str, object] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path, model: str, recipe_yaml: str) -> StepLog | None:
        """The state of a finished compression in ``folder`` (None: nothing to resume, compress first);
        refused when the folder was compressed from another model or recipe."""
        from llmopt.compression import RECIPE_FILE, REPORT_FILE

        if not (folder / REPORT_FILE).is_file() or not (folder / RECIPE_FILE).is_file():
            return None
        path = folder / PIPELINE_STATE
        try:
            d = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            saved_recipe = (folder / RECIPE_FILE).read_text(encoding="utf-8")
            saved_model = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError) as e:
            raise LLMOptError(f"--resume: cannot read the state of {folder} ({e}); rerun with --overwrite") from None
        if saved_recipe != recipe_yaml or saved_model != model:
            raise LLMOptError(
                f"--resume: {folder} was compressed from {saved_model} with another recipe than this run's; "
                "rerun with --overwrite to start again, or give another --output"
            )
        return cls(folder, model, recipe_yaml, dict(d.get("steps") or {}), dict(d.get("seconds") or {}))

    def save(self) -> None:
        from llmopt.outputs import write_text

        state = {"model": self.model, "steps": self.steps, "seconds": self.seconds}
        write_text(self.folder / PIPELINE_STATE, json.dumps(state, indent=1))

    def step(self, name: str, fn):
        """``fn()``'s result, run unless an earlier run recorded it (and its files are still there)."""
        done = self.steps.get(name)
        if done is not None and _files_exist(self.folder, done):
            log.info("--resume: %s already done", name)
            return done
        t = time.perf_counter()
        try:
            result = fn()
        except LLMOptError as e:
            raise LLMOptError(
                f"{name.replace('_', ' ', 1)} failed: {e} — the compressed model and the finished artifacts are "
                f"kept in {self.folder}; fix the cause and rerun with --resume to do only what is missing"
            ) from e
        self.steps[name] = result
        self.seconds[name] = round(time.perf_counter() - t, 2)
        self.save()
        return result


def _files_exist(folder: Path, record) -> bool:
    path = record.get("path") if isinstance(record, dict) else None
    return path is None or (folder / path).exists()


BASELINE_DIR = "baseline"


def baseline(model: str, recipe, btype: str, folder: Path, opts: PipelineOptions) -> dict:
    """llama.cpp's own quantization of the input model at ``btype``, with an importance matrix from the
    recipe's calibration windows (same data, count, length and seed): the row every llmopt artifact is
    compared with. Kept in ``baseline/`` (never pushed)."""
    from llmopt.exporters import export_gguf

    cal = recipe.calibration
    rel = f"{BASELINE_DIR}/llama.cpp-{btype}-imatrix.gguf"
    (folder / BASELINE_DIR).mkdir(exist_ok=True)
    r = export_gguf(
        model,
        str(folder / rel),
        type=btype,
        overwrite=True,
        imatrix=cal.data,
        imatrix_samples=cal.samples,
        imatrix_seq_len=cal.seq_len,
        imatrix_seed=cal.seed,
        threads=opts.threads,
    )
    label = f"llama.cpp {btype.upper()} + imatrix"
    return {"path": rel, "spec": str(folder / rel), "backend": "gguf", "role": "baseline", "label": label,
            "export": _plain(r)}  # fmt: skip


def export(target: str, folder: Path, opts: PipelineOptions) -> dict:
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


def evaluate_one(name: str, base, artifact: dict | None, folder: Path, opts: PipelineOptions, progress: bool) -> dict:
    """One artifact (or the input model, ``artifact`` None) on the evaluation windows; KL against ``base``."""
    from llmopt.evaluation import evaluate
    from llmopt.outputs import write_text

    kw = dict(
        data=opts.eval_data,
        seq_len=opts.eval_seq_len,
        max_windows=opts.eval_windows,
        speed=opts.speed,
        threads=opts.threads,
        progress=progress,
    )
    if artifact is None:
        d = {**evaluate(base, **kw).to_dict(), "model": "input model"}
    else:
        d = {**evaluate(artifact["spec"], base=base, backend=artifact["backend"], **kw).to_dict()}
        d["model"] = artifact["path"]
    d["path"] = f"eval/{name}.json"
    write_text(folder / "eval" / f"{name}.json", json.dumps(d, indent=1))
    return d


def harness_one(name: str, artifact: dict, folder: Path, opts: PipelineOptions, progress: bool) -> dict:
    import llmopt.harness as h
    from llmopt.outputs import write_text

    r = h.harness(
        artifact["spec"],
        opts.harness_tasks,
        include_path=opts.harness_include_path,
        limit=opts.harness_limit,
        backend=artifact["backend"],
        threads=opts.threads,
        progress=progress,
    )
    r = {**r, "model": artifact["path"], "path": f"harness/{name}.json"}
    write_text(folder / "harness" / f"{name}.json", json.dumps(r, indent=1))
    return r
