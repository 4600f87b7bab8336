"""The exported ONNX graph: which ``MatMul`` computes which HF Linear, and rewriting one into ``MatMulNBits``.

optimum's exporter (TorchScript tracing) turns each ``nn.Linear`` into a ``MatMul`` whose second input is
an initializer holding the weight transposed, (in, out), under a generated name (``onnx::MatMul_732``);
the node name usually carries the module path (``/model/layers.0/self_attn/q_proj/MatMul``) but nothing
guarantees it. Some Linears come out as a ``Gemm`` (OPT's fc1/fc2 with B under ``transB``, GPT-2's Conv1D
with its bias); those are rewritten too, the bias becoming ``MatMulNBits``' bias input. The mapping is
therefore made from the values: an initializer belongs to the Linear whose weight, in (in, out) layout,
has exactly its bytes; the node name only breaks ties between Linears whose weights are identical.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from llmopt.errors import LLMOptError
from llmopt.exporters.onnx.nbits import NBitsWeight

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
MS_DOMAIN = "com.microsoft"
_PROTO_LIMIT = 1_800_000_000  # bytes: above this the graph is saved with external data (protobuf's 2 GiB)


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every Linear-like module's weight in the layout of the ONNX MatMul's B: (in, out) float32.

    ``nn.Linear`` stores (out, in); transformers' ``Conv1D`` (GPT-2) already stores (in, out)."""
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        if isinstance(mod, torch.nn.Linear):
            out[name] = w.detach().float().t().contiguous()
        elif type(mod).__name__ == "Conv1D":
            out[name] = w.detach().float().contiguous()
    return out


def _key(arr: np.ndarray) -> tuple:
    return (tuple(arr.shape), hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest())


def map_matmuls(graph: onnx.GraphProto, weights: dict[str, torch.Tensor]) -> dict[str, onnx.NodeProto]:
    """HF Linear name → the ``MatMul`` / ``Gemm`` node whose constant B equals that Linear's (in, out) weight
    (or (out, in) under ``transB``) bit for bit.

    Linears without such a MatMul (folded, shared through a Transpose like a tied head) are absent."""
    by_key: dict[tuple, list[str]] = {}
    for name, w in weights.items():
        by_key.setdefault(_key(w.numpy()), []).append(name)
    inits = {i.name: i for i in graph.initializer}
    found: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        if not _is_linear_node(node) or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        if len(init.dims) != 2 or init.data_type != onnx.TensorProto.FLOAT:
            continue
        b = numpy_helper.to_array(init)
        names = by_key.get(_key(b.T if _attrs(node).get("transB", 0) else b), [])
        if len(names) > 1:  # identical weights: prefer the one the node is named after
            path = node.name.replace("/", ".")
            named = [n for n in names if f".{n}." in f"{path}."]
            names = named or names
        for n in names[:1]:
            if n in found:
                log.debug("%s: a second MatMul (%s) uses the same weight", n, node.name)
                continue
            found[n] = node
    return found


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _is_linear_node(node: onnx.NodeProto) -> bool:
    """A ``MatMul`` x·B, or a ``Gemm`` x·B (+ bias) without transA/alpha/beta (OPT's Linears, GPT-2's
    Conv1D); B may be transposed (``transB``)."""
    if node.op_type == "MatMul":
        return len(node.input) == 2
    if node.op_type != "Gemm":
        return False
    a = _attrs(node)
    return a.get("transA", 0) == 0 and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0


def replace_with_nbits(
    model: onnx.ModelProto, node: onnx.NodeProto, linear: str, w: NBitsWeight, accuracy_level: int
) -> None:
    """Swap ``node`` (MatMul or Gemm with constant B) for a ``MatMulNBits`` holding ``w`` (and the Gemm's
    bias); drops the old B initializer when no other node reads it."""
    graph = model.graph
    old_b = node.input[1]
    base = linear.replace(".", "_")
    inits = [
        numpy_helper.from_array(w.b, f"{base}_MatMulNBits_B"),
        numpy_helper.from_array(w.scales, f"{base}_MatMulNBits_scales"),
    ]
    inputs = [node.input[0], inits[0].name, inits[1].name]
    if w.zero_points is not None:
        inits.append(numpy_helper.from_array(w.zero_points, f"{base}_MatMulNBits_zero_points"))
        inputs.append(inits[-1].name)
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:  # bias: MatMulNBits input 5
        inputs += [""] * (5 - len(inputs)) + [node.input[2]]
    new = helper.make_node(
        "MatMulNBits",
        inputs,
        list(node.output),
        name=f"{node.name}_Q{w.bits}",
        doc_string=linear,  # the HF Linear whose stored codes these are
        domain=MS_DOMAIN,
        K=w.k,
        N=w.n,
        bits=w.bits,
        block_size=w.block_size,
        accuracy_level=accuracy_level,
    )
    idx = list(graph.node).index(node)
    graph.node.remove(node)
    graph.node.insert(idx, new)
    graph.initializer.extend(inits)
    if not any(old_b in n.input for n in graph.node):
        for i, init in enumerate(graph.initializer):
            if init.name == old_b:
                del graph.initializer[i]
                break
    ensure_ms_opset(model)


def ensure_ms_opset(model: onnx.ModelProto) -> None:
    """Declare the ``com.microsoft`` domain (version 1) once."""
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def set_accuracy_level(model: onnx.ModelProto, level: int) -> int:
    """Set ``accuracy_level`` on every ``MatMulNBits`` (ONNX Runtime's quantizers do not all take it);
    returns how many nodes there are."""
    n = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in list(node.attribute):
                if a.name == "accuracy_level":
                    node.attribute.remove(a)
            node.attribute.append(helper.make_attribute("accuracy_level", level))
            n += 1
    return n


def load(folder: Path) -> onnx.ModelProto:
    """The folder's ``model.onnx`` with its external data (if any) loaded."""
    path = folder / MODEL_FILE
    if not path.is_file():
        raise LLMOptError(f"{folder} has no {MODEL_FILE}: export it with llmopt export MODEL --to onnx")
    return onnx.load(str(path), load_external_data=True)


def save(model: onnx.ModelProto, folder: Path) -> None:
    """Write ``model.onnx`` (and ``model.onnx_data`` when over protobuf's limit), replacing old files."""
    for name in (MODEL_FILE, DATA_FILE):
        (folder / name).unlink(missing_ok=True)
    big = model.ByteSize() > _PROTO_LIMIT if _fits(model) else True
    onnx.save_model(
        model,
        str(folder / MODEL_FILE),
        save_as_external_data=big,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )


def _fits(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # noqa: BLE001 - protobuf refuses to size messages over 2 GiB
        return False
