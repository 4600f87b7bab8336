"""Export a model spec to an ONNX folder for ONNX Runtime (optimum-onnx's exporter, KV cache included).

The graph comes from optimum's exporter with the task ``text-generation-with-past``: inputs
``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value``; outputs ``logits``
and ``present.{i}.key/value``. The folder (``model.onnx``, ``config.json``, tokenizer files,
``llmopt_onnx.json``) loads with optimum's ``ORTModelForCausalLM`` and with llmopt's ``onnx`` backend.

``quant`` chooses what happens to the weights of the Linears' MatMuls:

``none``
    float32, as exported.
``int8-dynamic`` / ``int4-rtn`` / ``int4-hqq``
    ONNX Runtime's own quantizers (:mod:`.ortquant`), the baselines.
``auto``
    On an llmopt quantized output folder: every quantized Linear's stored codes and scales become the
    initializers of a ``MatMulNBits`` (:mod:`.nbits`), checked bit for bit against the format's
    dequantization, so ONNX Runtime computes with GPTQ's exact weights. A Linear whose format ``MatMulNBits``
    cannot hold exactly (q4_1's d·q + m blocks: the early ffn_down Linears of llama.cpp's q4_0 mixture) keeps
    a float32 MatMul with its exact saved weight, named in the report's ``linears_float``; when no stored
    Linear maps, the export is refused before any weight is loaded.

The output head stays float32 in every mode (a tied head is a Transpose of the embedding, which no quantizer
touches); a head a recipe quantized (the gptq stage's ``head``) holds exactly its codes' values as floats and
is named in the report's ``head_float``. The folder is written to a temporary
sibling and renamed on success; on any failure or interruption nothing is left (:mod:`llmopt.outputs`).

Modules: ``nbits`` (codes → MatMulNBits), ``graph`` (MatMul ↔ Linear mapping, rewriting, saving),
``ortquant`` (ONNX Runtime's quantizers).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from llmopt.errors import LLMOptError
from llmopt.outputs import atomic_output, preflight

log = logging.getLogger(__name__)

__all__ = ["ONNX_QUANTS", "REPORT_FILE", "export_onnx"]

ONNX_QUANTS = ("none", "int8-dynamic", "int4-rtn", "int4-hqq", "auto")
REPORT_FILE = "llmopt_onnx.json"
TASK = "text-generation-with-past"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def export_onnx(
    model_spec: str,
    output: str,
    quant: str = "none",
    block_size: int | None = None,
    accuracy_level: int = 0,
    overwrite: bool = False,
    opset: int | None = None,
) -> dict:
    """Write ``model_spec`` as an ONNX Runtime folder at ``output``; returns a small report.

    Args:
        model_spec: any spec :func:`llmopt.models.load_model` accepts; an llmopt quantized output folder
            for ``quant="auto"``.
        quant: one of :data:`ONNX_QUANTS` (see the module docstring).
        block_size: columns per 4-bit block for ``int4-rtn`` / ``int4-hqq`` (default 32; a power of two
            ≥ 16). With ``auto`` it comes from the stored groups; a different value is an error.
        accuracy_level: ``MatMulNBits``' compute type: 0 (default: float32 activations, as unquantized) or
            4 (activations quantized to int8 per block at run time; faster, an extra error).
        opset: ONNX opset for the exporter (None: optimum's default for the architecture).
    Returns:
        {"output", "quant", "block_size", "accuracy_level", "architecture", "file_bytes", "matmul_nbits",
        "linears_exact" (Linears written from stored codes), "linears_float" (stored Linears kept float32
        because MatMulNBits cannot hold their format), "head_float" (a quantized output head, kept float32),
        "seconds"}.
    """
    t0 = time.perf_counter()
    if quant not in ONNX_QUANTS:
        raise LLMOptError(f"unknown --quant '{quant}'; valid: {', '.join(ONNX_QUANTS)}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise LLMOptError(f"--accuracy-level must be one of 0, 1, 2, 3, 4 (0: float, 4: int8), got {accuracy_level}")
    if block_size is not None and (block_size < 16 or block_size & (block_size - 1)):
        raise LLMOptError(f"--block-size must be a power of two >= 16 (MatMulNBits), got {block_size}")
    if quant in ("none", "int8-dynamic") and (block_size is not None or accuracy_level):
        raise LLMOptError(f"--block-size and --accuracy-level apply to 4-bit weights, not --quant {quant}")
    out = preflight(output, overwrite=overwrite, kind="folder")

    from llmopt.exporters.gguf.codes import load_stored, read_index
    from llmopt.exporters.source import local_folder

    folder = local_folder(model_spec)
    index: dict = {}
    kept_float: list[str] = []
    if folder is not None:  # everything decidable without the weights, before loading them
        from llmopt.checkpoint import read_config

        check_architecture(read_config(folder).get("model_type"))
        index = read_index(folder)
    heads = [n for n, e in index.items() if e.get("head")]  # quantized output heads stay float (exact values)
    index = {n: e for n, e in index.items() if n not in heads}
    if quant == "auto":
        kept_float = _precheck_auto(model_spec, index, block_size)

    from llmopt.models import load_model

    loaded = load_model(model_spec, dtype=torch.float32)
    model, tokenizer = loaded.model, loaded.tokenizer
    arch = check_architecture(model.config.model_type)
    stored = load_stored(folder) if quant == "auto" and folder is not None else {}
    stored = {n: s for n, s in stored.items() if n not in kept_float and n not in heads}

    with atomic_output(out, overwrite=overwrite, kind="folder") as tmp:
        from llmopt.exporters.onnx import graph, ortquant

        _export_float(model, tmp, opset)
        tokenizer.save_pretrained(tmp)
        weights = graph.linear_weights(model)
        exact: list[str] = []
        head = _head_nodes(graph.load(tmp), weights) if quant != "none" else []
        if quant == "auto":
            exact = _write_stored(tmp, stored, weights, accuracy_level)
            block_size = _stored_block(stored)
        del model, loaded, weights
        if quant == "int8-dynamic":
            ortquant.int8_dynamic(tmp, head)
        elif quant in ("int4-rtn", "int4-hqq"):
            block_size = block_size or 32
            ortquant.int4_weight_only(tmp, quant.removeprefix("int4-"), block_size, accuracy_level, head)
        report = _summary(tmp)
        report.update(
            output=str(out),
            quant=quant,
            block_size=block_size if quant.startswith("int4") or quant == "auto" else None,
            accuracy_level=accuracy_level,
            architecture=arch,
            linears_exact=len(exact),
            linears_float=kept_float,
            head_float=heads,
            source=model_spec,
            seconds=round(time.perf_counter() - t0, 2),
        )
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))
    log.info("wrote %s (%.1f MiB, %d MatMulNBits)", out, report["file_bytes"] / 2**20, report["matmul_nbits"])
    return report


def check_architecture(model_type: str | None) -> str:
    """``model_type`` if optimum's ONNX exporter supports ``text-generation-with-past`` for it, else a
    one-line error naming the types it does support (from the config alone, before any weight)."""
    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers the ONNX configs with TasksManager
    from optimum.exporters.tasks import TasksManager

    names = sorted(TasksManager.get_supported_model_type_for_task(TASK, exporter="onnx"))
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(
            str(model_type), exporter="onnx", library_name="transformers"
        )
    except (KeyError, ValueError):
        tasks = {}
    if TASK not in tasks:
        shown = ", ".join(names[:40]) + (", ..." if len(names) > 40 else "")
        raise LLMOptError(
            f"optimum's ONNX exporter does not support '{model_type}' for {TASK}; supported model types "
            f"include: {shown}"
        )
    return str(model_type)


def _precheck_auto(model_spec: str, index: dict, block_size: int | None) -> list[str]:
    """``--quant auto`` needs stored codes that map exactly; decided before loading weights. Returns the
    Linears kept float32 (formats MatMulNBits cannot hold); refused when none maps, or when ``block_size``
    differs from the stored blocks."""
    from llmopt.exporters.gguf.codes import entry_format
    from llmopt.exporters.onnx.nbits import block_of

    if not index:
        raise LLMOptError(
            f"--quant auto writes the stored codes of an llmopt quantized output, and {model_spec} has none "
            "(no quantization.json): compress it with a gptq/rtn recipe first, or use --quant int4-rtn / int4-hqq"
        )
    refused: dict[str, LLMOptError] = {}
    for linear, entry in index.items():
        try:
            bs = block_of(linear, entry_format(entry))
        except LLMOptError as e:
            refused[linear] = e
            continue
        if block_size is not None and bs and bs != block_size:
            raise LLMOptError(
                f"--block-size {block_size} differs from the stored blocks of {bs} columns ({linear}); "
                "--quant auto keeps the stored blocks: omit --block-size"
            )
    if len(refused) == len(index):
        raise next(iter(refused.values()))
    if refused:
        log.warning(
            "%d of %d quantized Linears stay float32 in the ONNX graph (exact weights; MatMulNBits cannot hold "
            "their format): %s",
            len(refused),
            len(index),
            ", ".join(f"{n} ({entry_format(index[n])})" for n in refused),
        )
    return list(refused)


def _export_float(model: torch.nn.Module, folder: Path, opset: int | None) -> None:
    """optimum's exporter, float32, the KV-cache task; its own validation is skipped (the tests compare
    ONNX Runtime's logits with torch's)."""
    from optimum.exporters.onnx import onnx_export_from_model

    logging.getLogger("optimum").setLevel(logging.ERROR)
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    import warnings

    try:
        with warnings.catch_warnings():
            # the tracer's expected notes (Python booleans from tensors in the cache / mask code, advanced
            # indexing in opset 18): the graph is checked against torch's logits, the warnings only alarm users
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx\..*")
            onnx_export_from_model(model, folder, opset=opset, task=TASK, do_validation=False)
    except Exception as e:  # optimum/torch raise many kinds; one line for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LLMOptError(f"optimum's ONNX exporter failed on {model.config.model_type}: {msg}") from e


def _head_nodes(model, weights: dict[str, torch.Tensor]) -> list[str]:
    """Names of the MatMul nodes of the output head (kept float by every quantizer)."""
    from llmopt.exporters.onnx.graph import map_matmuls

    found = map_matmuls(model.graph, weights)
    return [found[n].name for n in found if n.split(".")[-1] in ("lm_head", "embed_out", "output")]


def _write_stored(folder: Path, stored: dict, weights: dict[str, torch.Tensor], accuracy_level: int) -> list[str]:
    """Rewrite every stored Linear's MatMul into a MatMulNBits from its codes; returns their names."""
    from llmopt.exporters.onnx import graph
    from llmopt.exporters.onnx.nbits import dequantize_nbits, to_nbits

    model = graph.load(folder)
    found = graph.map_matmuls(model.graph, weights)
    for linear, s in stored.items():
        if linear not in found:
            raise LLMOptError(
                f"{linear} has no MatMul with its weight in the exported ONNX graph (a Gemm, or a shared "
                "weight?): export with --quant none or int4-rtn"
            )
        deq = s.dequantize()  # (out, in) float32
        w = weights[linear].t()  # (out, in)
        if deq.shape != w.shape or not torch.equal(deq, w):
            raise LLMOptError(
                f"the stored codes of {linear} do not reproduce its saved weight (a later stage changed it, or "
                "the folder is not float32?): export with --quant none or int4-rtn"
            )
        nb = to_nbits(linear, s.fmt, s.codes, s.qp.scale, s.qp.zero)
        got = dequantize_nbits(nb.b, nb.scales, nb.zero_points, nb.k, nb.n, nb.block_size)
        if not torch.equal(torch.from_numpy(got).view(torch.int32), deq.contiguous().view(torch.int32)):
            raise LLMOptError(f"{linear}: the packed MatMulNBits weights do not dequantize to the codes bit for bit")
        graph.replace_with_nbits(model, found[linear], linear, nb, accuracy_level)
    graph.save(model, folder)
    return list(stored)


def _stored_block(stored: dict) -> int | None:
    from llmopt.exporters.onnx.nbits import block_of

    sizes = {block_of(n, s.fmt, s.codes.shape[1]) for n, s in stored.items()}
    return sizes.pop() if len(sizes) == 1 else None


def _summary(folder: Path) -> dict:
    """File bytes (all files of the folder) and node counts of the graph."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    onnx_bytes = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    return {
        "file_bytes": onnx_bytes,
        "matmul_nbits": ops.get("MatMulNBits", 0),
        "matmul_float": ops.get("MatMul", 0),
        "dynamic_int8": ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulInteger", 0),
    }
