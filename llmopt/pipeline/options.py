"""What happens after a recipe's stages (``--export``, ``--eval``, ``--harness``, ``--push-to-hub``): the
options, the checks made before any work, the llama.cpp type of the baseline row, a model's size from its
file headers (the duration estimate is :mod:`llmopt.pipeline.estimate`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmopt.errors import LLMOptError

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
    # with eval: also llama.cpp's own quantization of the input at the recipe's file type (imatrix, same windows)
    baseline: bool = True
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


def check_recipe(recipe, opts: PipelineOptions) -> None:
    """What can be known before any work: each ``--export`` target holds the recipe's formats exactly, the
    ``--harness`` tasks exist. (Per-Linear widths are checked by the stages' own pre-flight.)"""
    if "onnx" in opts.export and opts.onnx_quant == "auto":
        _check_onnx_mixes(recipe)
    fmts = recipe_formats(recipe)
    for target in opts.export:
        for fmt in fmts:
            entry = {"format": fmt.name if fmt.gguf_type is not None else "int", "bits": fmt.bits,
                     "group_size": fmt.group_size, "symmetric": fmt.symmetric}  # fmt: skip
            try:
                if target == "gguf" and opts.gguf_type == "auto":
                    from llmopt.exporters.gguf.codes import precheck

                    precheck({f"the recipe's {fmt}": entry})
                elif target == "onnx" and opts.onnx_quant == "auto":
                    from llmopt.exporters.onnx.nbits import block_of

                    block_of(f"the recipe's {fmt}", fmt)
            except LLMOptError as e:
                raise LLMOptError(
                    f"--export {target} cannot hold this recipe's output exactly (checked before any work): {e}; "
                    f"or drop {target} from --export"
                ) from None
    if opts.harness_tasks:
        from llmopt.harness.tasks import check_include_paths, parse_task_names, resolve_tasks

        resolve_tasks(parse_task_names(opts.harness_tasks), check_include_paths(opts.harness_include_path))


def _check_onnx_mixes(recipe) -> None:
    """Refuse ``--export onnx`` of a llama.cpp mix that writes K-quant or IQ4 blocks (its mix may give any
    Linear such a type): ``MatMulNBits`` holds 4-bit blocks with one scale and zero point, not two-level
    super-blocks (6-/8-bit sub-block scales under an fp16 d) or IQ4's non-linear grid."""
    from llmopt.core.llama_mix import candidate_types

    for st in recipe.stages:
        ftype = getattr(st, "file_type", None)
        blocks = sorted(t.name for t in candidate_types(ftype) if _superblock_or_iq(t)) if ftype else []
        if blocks:
            raise LLMOptError(
                f"--export onnx cannot hold llama.cpp's {ftype} mix ({', '.join(blocks)} blocks; MatMulNBits holds "
                "4-bit blocks with one scale and zero point): drop onnx from --export, or quantize to q4_0"
            )


def _superblock_or_iq(t) -> bool:
    import gguf

    return gguf.GGML_QUANT_SIZES[t][0] == 256 or t.name.startswith("IQ")


def recipe_formats(recipe) -> list:
    """The number format of each quantization stage of ``recipe``, in order (a llama.cpp mix: its default
    type's, q4_k_m: q4_K; the other types of the mix are all GGUF block formats)."""
    return [st.make_format() for st in recipe.stages if hasattr(st, "make_format")]


def baseline_type(recipe) -> str | None:
    """The llama.cpp file type the recipe's quantization maps to (its last quantization stage: q4_0 → Q4_0,
    q4_k_m → Q4_K_M, q6_K → Q6_K; symmetric int4/int8 in blocks of 32k → Q4_0/Q8_0), or None when llama.cpp
    has no type of that format."""
    from llmopt.core.llama_mix import file_type
    from llmopt.exporters.gguf.plan import LLAMA_FTYPES

    stages = [st for st in recipe.stages if hasattr(st, "make_format")]
    if not stages:
        return None
    named = file_type(stages[-1].format)
    if named in LLAMA_FTYPES:
        return named
    fmt = stages[-1].make_format()
    if fmt.gguf_type is None and fmt.symmetric and fmt.bits in (4, 5, 8):
        g = fmt.group_size
        if g is not None and g % 32 == 0:
            return "q8_0" if fmt.bits == 8 else f"q{fmt.bits}_0"
    return None


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
