"""Recipes: YAML files that list compression stages, validated with pydantic.

.. code-block:: yaml

    name: sparsegpt-50
    calibration: {data: wikitext2, samples: 32, seq_len: 512, seed: 0}
    stages:
      - stage: sparsegpt
        sparsity: 0.5

Every model forbids unknown keys (``extra="forbid"``): a misspelt key is an error that names the valid
ones. Stage names resolve through the one registry in :mod:`llmopt.stages`.

The shipped recipes are package data (``llmopt/recipes/*.yaml``; ``configs/`` in a checkout links there), so
a bare name (``sparsegpt-50``) resolves in a wheel install as in a checkout; :func:`shipped_recipes` lists
them with the first sentence of each file's leading comment.
"""

from __future__ import annotations

import re
import typing
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, field_validator

from llmopt.core.config import StrictModel
from llmopt.errors import LLMOptError, read_text
from llmopt.stages import REGISTRY

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def shipped_recipes() -> dict[str, Path]:
    """Name → path of every recipe shipped with llmopt, sorted by name."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_summary(path: Path, max_chars: int = 110) -> str:
    """What a recipe does: the first sentence of its leading ``#`` comment block (shortened to
    ``max_chars`` at a word boundary), or "" when the file starts without a comment."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(x for x in lines if x)
    m = re.search(r"\.(?=\s+[A-Z(]|$)", text)  # a sentence end: '.' before a capital or the end
    text = text[: m.end()] if m else text
    if len(text) > max_chars:
        text = text[: max_chars - 1].rsplit(" ", 1)[0].rstrip(",;:") + "…"
    return text


def resolve_recipe_name(name: str) -> Path:
    """The shipped recipe called ``name`` (``sparsegpt-50``; a trailing ``.yaml`` is allowed)."""
    recipes = shipped_recipes()
    stem = name.removesuffix(".yaml").removesuffix(".yml")
    if stem not in recipes:
        raise LLMOptError(
            f"unknown recipe '{name}': not a file and not a shipped recipe; shipped: {', '.join(recipes)} "
            "(`llmopt recipes` describes them)"
        )
    return recipes[stem]


class CalibrationConfig(StrictModel):
    """Where calibration windows come from (GPTQ-paper sampling; see :mod:`llmopt.data`)."""

    data: str = "wikitext2"
    samples: int = Field(32, ge=1)
    seq_len: int = Field(512, ge=2)
    seed: int = Field(0, ge=0, le=2**63 - 1)  # torch.Generator (self:N sampling) takes at most 64 bits
    # windows per forward in the calibration engine: 2 x 512 tokens keeps a layer's transients ~45 MiB on
    # the embedded model (4: ~90, 8: ~170) at the same speed on CPU; glibc reuses them on its heap between
    # batches (llmopt.memory.release_freed_memory says why no small mmap threshold)
    batch_size: int = Field(2, ge=1)
    # calibrate a layer's Linears group by group in the order its forward calls them (q/k/v, o, gate/up,
    # down for Llama), each group on the outputs of the already compressed earlier ones (GPTQ code)
    true_sequential: bool = False

    @field_validator("data")
    @classmethod
    def _check_data(cls, v: str) -> str:
        from llmopt.data import parse_data_spec

        parse_data_spec(v)
        return v


class EvaluationConfig(StrictModel):
    """What ``llmopt compress --eval`` measures every artifact on, unless ``--eval-data``,
    ``--eval-seq-len`` or ``--eval-windows`` say otherwise (saved with the recipe, shown in the report)."""

    data: str = "wikitext2"
    seq_len: int = Field(2048, ge=16)
    windows: int | None = Field(8, ge=1)  # None = every window of the text

    @field_validator("data")
    @classmethod
    def _check_data(cls, v: str) -> str:
        from llmopt.data import parse_data_spec

        parse_data_spec(v)
        return v


@cache
def _recipe_model() -> type[BaseModel]:
    configs = tuple(cls.Config for cls in REGISTRY.values())
    StageUnion = Annotated[typing.Union[configs], Field(discriminator="stage")]  # noqa: UP007

    class Recipe(StrictModel):
        name: str | None = None
        description: str | None = None
        calibration: CalibrationConfig = CalibrationConfig()
        evaluation: EvaluationConfig = EvaluationConfig()
        stages: list[StageUnion] = Field(min_length=1)  # type: ignore[valid-type]

    return Recipe


def _nested_model(model: Any, field: str) -> Any:
    """The pydantic model a field of ``model`` holds (``X | None`` included), or None."""
    info = model.model_fields.get(field)
    if info is None:
        return None
    for t in (info.annotation, *typing.get_args(info.annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _one_line(err: ValidationError, raw: dict) -> str:
    """Turn pydantic's multi-line report into one actionable line (first error only)."""
    # A misspelt key also makes the intended one "missing"; report the misspelling, it is the cause.
    priority = {"extra_forbidden": 0, "union_tag_invalid": 1, "union_tag_not_found": 1}
    e = min(err.errors(), key=lambda x: priority.get(x["type"], 2))
    loc = [str(x) for x in e["loc"]]
    where = ".".join(loc)
    if e["type"] == "union_tag_invalid" or e["type"] == "union_tag_not_found":
        got = e.get("input", {}).get("stage") if isinstance(e.get("input"), dict) else None
        return f"unknown stage '{got}' at {where or 'stages'}; valid stages: {', '.join(REGISTRY)}"
    if e["type"] == "extra_forbidden":
        key = loc[-1]
        model: Any = _recipe_model()
        ctx = "recipe"
        if loc[0] == "calibration":
            model, ctx = CalibrationConfig, "calibration"
        elif loc[0] == "evaluation":
            model, ctx = EvaluationConfig, "evaluation"
        elif loc[0] == "stages" and len(loc) >= 3:
            model = REGISTRY[loc[2]].Config
            ctx = f"stage {int(loc[1]) + 1} ({loc[2]})"
            for part in loc[3:-1]:  # a nested entry (owl, gradual): its own keys
                sub = _nested_model(model, part)
                if sub is None:
                    break
                model, ctx = sub, f"{ctx} {part}"
        valid = ", ".join(model.model_fields)
        return f"unknown key '{key}' in {ctx}; valid keys: {valid}"
    msg = e["msg"].removeprefix("Value error, ")
    if loc[:1] == ["stages"] and len(loc) >= 3:
        where = f"stage {int(loc[1]) + 1} ({loc[2]}) {'.'.join(loc[3:])}".strip()
    return f"invalid recipe value at {where}: {msg}"


def parse_recipe(source: str | Path | dict) -> BaseModel:
    """A recipe from a YAML path, a shipped recipe's name (``sparsegpt-50``), a YAML string, or a dict.
    Raises LLMOptError with one line. An existing file wins over a shipped recipe of the same name."""
    if isinstance(source, dict):
        raw = source
    else:
        text = str(source)
        p = Path(text)
        one_line = "\n" not in text
        if one_line and not p.exists() and _NAME.fullmatch(text):
            if p.suffix not in (".yaml", ".yml"):
                p = resolve_recipe_name(text)  # a bare name: the shipped recipe
            elif p.stem in shipped_recipes():
                p = shipped_recipes()[p.stem]  # "sparsegpt-50.yaml", no folder, not in the current one
        if one_line and (p.suffix in (".yaml", ".yml") or p.exists()):
            if not p.is_file():
                raise LLMOptError(f"recipe not found: {p} (`llmopt recipes` lists the shipped ones, by name)")
            text = read_text(p, "recipe")
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise LLMOptError(f"recipe is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise LLMOptError("a recipe is a YAML mapping with a 'stages' list; `llmopt recipes` lists shipped examples")
    try:
        return TypeAdapter(_recipe_model()).validate_python(raw)
    except ValidationError as e:
        raise LLMOptError(_one_line(e, raw)) from None


def recipe_to_yaml(recipe: BaseModel) -> str:
    """The resolved recipe (all defaults filled in), as saved next to every output."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


#: CLI flag of each calibration field (errors name what the user typed)
CALIBRATION_FLAGS = {
    "data": "--calib",
    "samples": "--calib-samples",
    "seq_len": "--calib-seq-len",
    "seed": "--seed",
    "true_sequential": "--true-sequential",
}


def apply_calibration_overrides(recipe: BaseModel, **overrides: Any) -> BaseModel:
    """``recipe`` with calibration fields replaced (None values skipped), validated exactly like the
    same values written in the recipe; a bad value is a one-line error naming its CLI flag."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides:
        return recipe
    try:
        cal = CalibrationConfig.model_validate({**recipe.calibration.model_dump(), **overrides})
    except ValidationError as e:
        err = e.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        raise LLMOptError(f"{CALIBRATION_FLAGS.get(key, key)} {overrides.get(key)!r}: {msg}") from None
    return recipe.model_copy(update={"calibration": cal})
