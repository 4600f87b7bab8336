"""ONNX Runtime's own quantizers, the baselines llmopt's exact GPTQ codes are compared against.

* ``int8-dynamic``: :func:`onnxruntime.quantization.quantize_dynamic`, int8 weights per output channel,
  activations quantized at run time (``DynamicQuantizeMatMul``); only MatMuls with a constant weight.
* ``int4-rtn``: ``MatMulNBitsQuantizer`` with ``DefaultWeightOnlyQuantConfig`` (round to nearest,
  asymmetric blocks with zero points unless ``symmetric``).
* ``int4-hqq``: ``MatMulNBitsQuantizer`` with ``HQQWeightOnlyQuantConfig`` (half-quadratic optimisation of
  scales and zero points).

``exclude`` names MatMul nodes left in float (the output head, like llmopt's default ``ignore``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from llmopt.exporters.onnx.graph import DATA_FILE, MODEL_FILE, load, save, set_accuracy_level

log = logging.getLogger(__name__)


def int8_dynamic(folder: Path, exclude: list[str]) -> None:
    """Replace the folder's float graph by its dynamically quantized int8 twin (in place)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = folder / MODEL_FILE
    dst = folder / "model.int8.onnx"
    big = (folder / DATA_FILE).exists()
    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
        use_external_data_format=big,
        extra_options={"MatMulConstBOnly": True},
    )
    model = onnx.load(str(dst), load_external_data=True)
    dst.unlink()
    for extra in folder.glob("model.int8.onnx*"):
        extra.unlink()
    save(model, folder)


def int4_weight_only(folder: Path, algo: str, block_size: int, accuracy_level: int, exclude: list[str]) -> int:
    """4-bit ``MatMulNBits`` by ONNX Runtime's RTN (``algo="rtn"``) or HQQ (``"hqq"``) quantizer, in place;
    returns how many MatMuls were quantized."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = load(folder)
    if algo == "rtn":
        cfg = DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",)
        )
    else:
        cfg = HQQWeightOnlyQuantConfig(block_size=block_size, bits=4, op_types_to_quantize=("MatMul",))
    q = MatMulNBitsQuantizer(
        model,
        block_size=block_size,
        is_symmetric=False,
        accuracy_level=accuracy_level,
        nodes_to_exclude=exclude,
        algo_config=cfg,
    )
    q.process()
    out = q.model.model
    n = set_accuracy_level(out, accuracy_level)
    save(out, folder)
    log.info("ONNX Runtime %s: %d MatMulNBits (block %d, accuracy level %d)", algo, n, block_size, accuracy_level)
    return n
