"""What an llmopt output folder holds, read from the folder alone (no torch): its report, recipe, the
``llmopt eval --json`` / ``llmopt harness --json`` results anywhere in it, GGUF files and ONNX folders; and
the Hub ids the model and data specs name. :mod:`llmopt.hub.card` writes the model card from it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

REPORT_FILE = "llmopt_report.json"  # same names as llmopt.compression (not imported: it pulls in torch)
RECIPE_FILE = "recipe.yaml"
README = "README.md"

#: ``bundled:<name>`` → the Hub model the bundled GGUF was converted from
BUNDLED_HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]")
_EVAL_KEYS = {"perplexity", "backend", "data", "seq_len", "windows"}
HARNESS_KIND = "lm-eval-harness"  # llmopt.harness.run.RESULT_KIND (not imported: it pulls in lm-eval)
_MAX_JSON_BYTES = 2 << 20


@dataclass
class Artifacts:
    """What an output folder holds (paths relative to it, POSIX style)."""

    folder: Path
    report: dict | None = None
    recipe_yaml: str | None = None
    evals: list[tuple[str, dict]] = field(default_factory=list)  # (json file, `llmopt eval --json` result)
    harness: list[tuple[str, dict]] = field(default_factory=list)  # (json file, `llmopt harness --json` result)
    ggufs: list[tuple[str, int]] = field(default_factory=list)  # (file, bytes)
    onnx_dirs: list[str] = field(default_factory=list)  # "" is the folder itself
    transformers: bool = False  # config.json and *.safetensors at the top
    quantization_codes: bool = False  # quantization.safetensors (stored GPTQ/RTN codes and scales)


#: llama.cpp's own quantization of the input, the report's reference row: not this model's file, never pushed
BASELINE_DIR = "baseline"


def _files(folder: Path):
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.parts[0] != BASELINE_DIR:
            yield rel.as_posix(), p


def scan(folder: str | Path) -> Artifacts:
    folder = Path(folder)
    a = Artifacts(folder)
    onnx = set()
    for rel, p in _files(folder):
        if rel == REPORT_FILE:
            a.report = read_json(p)
        elif rel == RECIPE_FILE:
            a.recipe_yaml = p.read_text(encoding="utf-8")
        elif p.suffix == ".json" and p.stat().st_size < _MAX_JSON_BYTES:
            d = read_json(p)
            if isinstance(d, dict) and _EVAL_KEYS <= d.keys():
                a.evals.append((rel, d))
            elif isinstance(d, dict) and d.get("kind") == HARNESS_KIND and isinstance(d.get("tasks"), dict):
                a.harness.append((rel, d))
        elif p.suffix == ".gguf":
            a.ggufs.append((rel, p.stat().st_size))
        elif p.suffix == ".onnx":
            onnx.add("" if "/" not in rel else rel.rsplit("/", 1)[0])
    a.onnx_dirs = sorted(onnx)
    a.transformers = (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    a.quantization_codes = (folder / "quantization.safetensors").is_file()
    return a


def read_json(p: Path):
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def hub_base_model(spec: str | None) -> str | None:
    """The Hub id a model spec names: ``org/name`` itself, ``bundled:<name>``'s source; None for paths."""
    if not spec:
        return None
    if spec.startswith("bundled:"):
        return BUNDLED_HUB_IDS.get(spec[len("bundled:") :])
    if HUB_ID.fullmatch(spec) and not Path(spec).exists() and not spec.endswith(".gguf"):
        return spec
    return None


def dataset_of(spec: str) -> tuple[str | None, str, str | None, str | None]:
    """(Hub dataset id, display name, config, split) of an evaluation data spec (``llmopt.data`` forms); the id
    is None for local data (``text:PATH``), which has no place in model-index."""
    s = spec.strip()
    if s in ("wikitext2", "wikitext-2"):
        return "Salesforce/wikitext", "WikiText-2", "wikitext-2-raw-v1", "test"
    if s == "c4":
        return "allenai/c4", "C4", "en", "validation"
    if s.startswith("hf:"):
        parts = s[3:].split(":")
        config = parts[1] if len(parts) >= 3 else None
        split = parts[2] if len(parts) >= 3 else parts[-1] if len(parts) == 2 else None
        return parts[0], parts[0], config, split
    if s.startswith("text:"):
        path, _, frac = s[5:].partition("#")
        return None, Path(path).name + (f"#{frac}" if frac else ""), None, None
    return None, s, None, None
