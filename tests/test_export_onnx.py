"""ONNX export (optimum-onnx, KV cache) and the ONNX Runtime (``onnx``) backend.

Properties: a float32 export gives ONNX Runtime torch's logits (max |Δ| ≤ 1e-4 on logits of magnitude
~40, float32 reassociation only) through llmopt's backend, through optimum's ``ORTModelForCausalLM`` and
through the KV cache; ``--quant auto`` writes the stored codes as ``MatMulNBits`` initializers whose
dequantization (a numpy reference and ONNX Runtime's own kernel) equals the folder's quantized weights
bit for bit; ONNX Runtime's quantizers produce the expected operators; bad inputs give one-line errors
and leave no folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmopt.errors import LLMOptError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("optimum.exporters.onnx")

from onnx import helper, numpy_helper  # noqa: E402

from llmopt.exporters import export, export_onnx  # noqa: E402
from llmopt.exporters.onnx.nbits import dequantize_nbits  # noqa: E402

LOGIT_ATOL = 1e-4  # float32 ONNX Runtime vs float32 torch, logits of magnitude ~40


def _torch_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids.view(1, -1)).logits[0].float()


def _ids(n: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny-f32"
    report = export_onnx(str(tiny_model_dir), str(out))
    assert report["matmul_nbits"] == 0 and report["quant"] == "none"
    return out


def test_f32_export_matches_torch_logits_and_kv_cache(tiny_model_dir, tiny_onnx):
    from llmopt.backends import make_backend

    ids = _ids()
    ref = _torch_logits(tiny_model_dir, ids)
    be = make_backend("auto", str(tiny_onnx), threads=1)  # a folder with model.onnx → ONNX Runtime
    assert be.name == "onnx" and be.vocab_size == ref.shape[-1]
    got = be.logits(ids)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= LOGIT_ATOL
    # decode with the KV cache: one token at a time after a 20-token prefill gives the same logits
    x = ids.view(1, -1).numpy()
    _, past = be.forward(x[:, :20])
    steps = []
    for t in range(20, ids.numel()):
        logits, past = be.forward(x[:, t : t + 1], past, t)
        steps.append(logits[0, -1])
    assert float(np.abs(np.stack(steps) - ref[20:].numpy()).max()) <= LOGIT_ATOL
    speed = be.time_generation(ids[:16], 4)
    assert speed.prompt_tokens == 16 and speed.new_tokens == 4 and speed.threads == 1
    assert speed.dtype == "onnx float32"


def test_logit_blocks_are_chunked_runs_on_the_kv_cache(tiny_model_dir, tiny_onnx, monkeypatch):
    from llmopt.backends.onnx_backend import OnnxBackend

    ids = _ids()
    want = list(OnnxBackend(tiny_onnx, threads=1).greedy(ids[:30].tolist(), 6))  # prefill: one run
    monkeypatch.setattr("llmopt.backends.onnx_backend.block_rows", lambda vocab: 7)
    be = OnnxBackend(tiny_onnx, threads=1)
    runs = []
    run = be.session.run
    monkeypatch.setattr(be.session, "run", lambda names, feed: runs.append(feed["input_ids"].shape) or run(names, feed))
    blocks = list(be.logit_blocks(ids))
    assert [b.shape for b in blocks] == [(7, be.vocab_size)] * 6 + [(6, be.vocab_size)]
    assert runs == [(1, 7)] * 6 + [(1, 6)]  # one graph run per block: never the (48, V) logits at once
    ref = _torch_logits(tiny_model_dir, ids)
    assert float((torch.cat(blocks) - ref).abs().max()) <= LOGIT_ATOL
    assert torch.allclose(torch.cat(blocks), be.logits(ids), atol=1e-5)
    assert [b.shape[0] for b in be.logit_blocks(ids[:7])] == [7]  # one block: one run
    runs.clear()
    assert list(be.greedy(ids[:30].tolist(), 6)) == want
    assert runs[:5] == [(1, 7)] * 4 + [(1, 2)] and set(runs[5:]) == {(1, 1)}  # prefill in blocks, then 1 per run


def test_f32_export_loads_with_optimum_and_generates(tiny_model_dir, tiny_onnx):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM

    ids = _ids(12).view(1, -1)
    om = ORTModelForCausalLM.from_pretrained(tiny_onnx)
    assert om.use_cache
    tm = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    mask = torch.ones_like(ids)
    got = om.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=2)
    want = tm.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert got.tolist() == want.tolist()
    assert (tiny_onnx / "tokenizer.json").is_file() and (tiny_onnx / "config.json").is_file()


def _ort_dequantize(node, inits: dict) -> np.ndarray:
    """ONNX Runtime's own MatMulNBits kernel on A = I (K×K): the (K, N) weight it computes with."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n = attrs["K"], attrs["N"]
    names = [i for i in node.input[1:] if i]
    g = helper.make_graph(
        [helper.make_node("MatMulNBits", ["A", *names], ["Y"], domain="com.microsoft", **attrs)],
        "deq",
        [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [k, k])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [k, n])],
        [inits[i] for i in names],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": np.eye(k, dtype=np.float32)})[0]


@pytest.mark.parametrize(
    "name,stage",
    [
        ("q4_0", {"stage": "rtn", "format": "q4_0"}),
        ("w4g32-asym", {"stage": "rtn", "format": "int", "bits": 4, "group_size": 32, "symmetric": False}),
        ("gptq-w4g16", {"stage": "gptq", "format": "int", "bits": 4, "group_size": 16, "symmetric": True}),
    ],
)
def test_auto_writes_stored_codes_bit_exact(tiny_model_dir, tiny_text_file, tmp_path, name, stage):
    from safetensors.torch import load_file

    from llmopt.compression import compress
    from llmopt.exporters.gguf.codes import load_stored

    recipe = {"name": name, "stages": [stage]}
    if stage["stage"] == "gptq":
        recipe["calibration"] = {"data": f"text:{tiny_text_file}", "samples": 4, "seq_len": 64}
    folder = tmp_path / name
    compress(str(tiny_model_dir), recipe, folder)
    out = tmp_path / f"{name}-onnx"
    report = export_onnx(str(folder), str(out), quant="auto", accuracy_level=0)
    assert report["matmul_nbits"] == report["linears_exact"] == 14  # 2 layers x 7 Linears; tied head float

    stored = load_stored(folder)
    weights = load_file(str(folder / "model.safetensors"))
    model = onnx.load(str(out / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    seen = set()
    for node in nodes:
        linear = node.doc_string  # the Linear the exporter wrote these codes for
        seen.add(linear)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        zp = numpy_helper.to_array(inits[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
        ref = dequantize_nbits(
            numpy_helper.to_array(inits[node.input[1]]),
            numpy_helper.to_array(inits[node.input[2]]),
            zp,
            attrs["K"],
            attrs["N"],
            attrs["block_size"],
        )  # (N, K)
        want = weights[f"{linear}.weight"].float().numpy()  # the folder's saved (fake-quant) weight (out, in)
        assert np.array_equal(ref.view(np.int32), want.view(np.int32)), linear
        assert np.array_equal(ref.view(np.int32), stored[linear].dequantize().numpy().view(np.int32))
        by_ort = _ort_dequantize(node, inits)  # (K, N) = Wᵀ
        assert np.array_equal(by_ort.T, want), linear
    assert seen == set(stored)

    ids = _ids()
    from llmopt.backends.onnx_backend import OnnxBackend

    got = OnnxBackend(out, threads=1).logits(ids)
    assert float((got - _torch_logits(folder, ids)).abs().max()) <= LOGIT_ATOL


def test_auto_keeps_q4_1_guard_linears_float(tiny_text_file, tmp_path):
    """GPTQ q4_0 with llama.cpp's mixture (the default): the early ffn_down Linears are q4_1, which
    MatMulNBits cannot hold exactly; they stay float32 MatMuls with their exact saved weights, every other
    Linear becomes a MatMulNBits from its codes, and ONNX Runtime's logits equal torch's."""
    from llmopt.compression import compress
    from tests.conftest import make_tiny_llama, make_tiny_tokenizer

    d = tmp_path / "tiny8"
    tok = make_tiny_tokenizer(tiny_text_file.read_text())
    make_tiny_llama(len(tok), layers=8, hidden=32).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    calib = {"data": f"text:{tiny_text_file}", "samples": 4, "seq_len": 64}
    folder = tmp_path / "gptq-q4_0"
    compress(str(d), {"calibration": calib, "stages": [{"stage": "gptq", "format": "q4_0"}]}, folder)
    index = json.loads((folder / "quantization.json").read_text())
    assert {n for n, e in index.items() if e["format"] == "q4_1"} == {"model.layers.0.mlp.down_proj"}
    out = tmp_path / "onnx"
    report = export_onnx(str(folder), str(out), quant="auto")
    assert report["linears_float"] == ["model.layers.0.mlp.down_proj"]
    assert report["matmul_nbits"] == report["linears_exact"] == 8 * 7 - 1
    model = onnx.load(str(out / "model.onnx"))
    assert {n.doc_string for n in model.graph.node if n.op_type == "MatMulNBits"} == set(index) - {
        "model.layers.0.mlp.down_proj"
    }
    from llmopt.backends.onnx_backend import OnnxBackend

    ids = _ids()
    got = OnnxBackend(out, threads=1).logits(ids)
    assert float((got - _torch_logits(folder, ids)).abs().max()) <= LOGIT_ATOL


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "gpt2", "opt"])
def test_auto_on_other_architectures(arch, tiny_text_file, tmp_path):
    """Biases (qwen2), fused qkv / gate_up (phi3), Conv1D as Gemm + bias (gpt2), Gemm with transB (opt):
    every quantized Linear is found in the graph and ONNX Runtime reproduces torch's logits."""
    from llmopt.compression import compress
    from llmopt.exporters.gguf.codes import read_index
    from tests.conftest import make_tiny_tokenizer
    from tests.tiny_archs import save_tiny_model

    src, folder, out = tmp_path / arch, tmp_path / f"{arch}-q4_0", tmp_path / f"{arch}-onnx"
    save_tiny_model(arch, src, make_tiny_tokenizer(tiny_text_file.read_text()), sliding=False)
    compress(str(src), {"name": "q4_0", "stages": [{"stage": "rtn", "format": "q4_0"}]}, folder)
    report = export_onnx(str(folder), str(out), quant="auto")
    assert report["linears_exact"] == report["matmul_nbits"] == len(read_index(folder))
    from llmopt.backends.onnx_backend import OnnxBackend

    ids = _ids(40)
    got = OnnxBackend(out, threads=1).logits(ids)
    assert float((got - _torch_logits(folder, ids)).abs().max()) <= LOGIT_ATOL


@pytest.mark.parametrize(
    "quant,op,level",
    [("int8-dynamic", "MatMulInteger", 0), ("int4-rtn", "MatMulNBits", 4), ("int4-hqq", "MatMulNBits", 0)],
)
def test_onnxruntime_quantizers(tiny_model_dir, tmp_path, quant, op, level):
    out = tmp_path / quant
    kw = {"block_size": 32, "accuracy_level": level} if quant.startswith("int4") else {}
    report = export(str(tiny_model_dir), to="onnx", output=str(out), quant=quant, **kw)
    model = onnx.load(str(out / "model.onnx"))
    ops = [n for n in model.graph.node if n.op_type == op]
    assert len(ops) == 14, quant
    for n in ops:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if op == "MatMulNBits":
            assert attrs["block_size"] == 32 and attrs["accuracy_level"] == level and attrs["bits"] == 4
    info = json.loads((out / "llmopt_onnx.json").read_text())
    assert info["quant"] == quant and report["file_bytes"] > 0
    from llmopt.backends.onnx_backend import OnnxBackend

    logits = OnnxBackend(out, threads=1).logits(_ids())
    assert torch.isfinite(logits).all()


def test_python_api_export_to_onnx(tiny_model_dir, tmp_path):
    """``llmopt.export(model, to="onnx", output=DIR, ...)`` takes the options of ``llmopt export --to onnx``."""
    import llmopt

    out = tmp_path / "api"
    out.mkdir()
    (out / "old.txt").write_text("replaced only with overwrite=True")
    with pytest.raises(LLMOptError, match="already exists"):
        llmopt.export(str(tiny_model_dir), to="onnx", output=str(out))
    kw = {"quant": "int4-rtn", "block_size": 16, "accuracy_level": 4, "overwrite": True}
    r = llmopt.export(str(tiny_model_dir), to="onnx", output=str(out), **kw)
    assert (r["quant"], r["block_size"], r["accuracy_level"], r["matmul_nbits"]) == ("int4-rtn", 16, 4, 14)
    assert (out / "model.onnx").is_file() and not (out / "old.txt").exists()
    with pytest.raises(LLMOptError, match="valid targets: gguf, onnx"):
        llmopt.export(str(tiny_model_dir), to="tflite", output=str(tmp_path / "x"))


def _no_leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}"))]


def test_bad_inputs_one_line_errors_no_partial_folder(tiny_model_dir, tiny_onnx, tmp_path):
    # an existing output
    with pytest.raises(LLMOptError, match="already exists"):
        export_onnx(str(tiny_model_dir), str(tiny_onnx))
    # an unsupported architecture (refused from config.json, before any weight)
    bad = tmp_path / "mamba"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(LLMOptError, match="does not support 'mamba'") as e:
        export_onnx(str(bad), str(tmp_path / "out-mamba"))
    assert "\n" not in str(e.value) and not _no_leftovers(tmp_path, "out-mamba")
    # --quant auto on a folder without stored codes
    with pytest.raises(LLMOptError, match="no quantization.json"):
        export_onnx(str(tiny_model_dir), str(tmp_path / "out-auto"), quant="auto")
    assert not _no_leftovers(tmp_path, "out-auto")
    # unknown quant / bad block size / level
    with pytest.raises(LLMOptError, match="valid: none, int8-dynamic"):
        export_onnx(str(tiny_model_dir), str(tmp_path / "x"), quant="int3")
    with pytest.raises(LLMOptError, match="power of two"):
        export_onnx(str(tiny_model_dir), str(tmp_path / "x"), quant="int4-rtn", block_size=48)
    with pytest.raises(LLMOptError, match="accuracy-level"):
        export_onnx(str(tiny_model_dir), str(tmp_path / "x"), quant="int4-rtn", accuracy_level=7)


@pytest.mark.parametrize(
    "name,stage,why",
    [
        ("q4_1", {"stage": "rtn", "format": "q4_1"}, "no MatMulNBits equivalent"),
        ("w3", {"stage": "rtn", "format": "int", "bits": 3, "group_size": 32}, "3-bit"),
        ("w4g8", {"stage": "rtn", "format": "int", "bits": 4, "group_size": 8}, "groups of 8 columns"),
    ],
)
def test_auto_refuses_formats_it_cannot_map_exactly(tiny_model_dir, tmp_path, name, stage, why):
    from llmopt.compression import compress

    folder = tmp_path / name
    compress(str(tiny_model_dir), {"name": name, "stages": [stage]}, folder)
    with pytest.raises(LLMOptError, match=why) as e:
        export_onnx(str(folder), str(tmp_path / "out"), quant="auto")
    msg = str(e.value)
    assert "\n" not in msg and "q4_0, int4" in msg  # names the formats that can be mapped
    assert not _no_leftovers(tmp_path, "out")


def test_cli_export_onnx(tiny_model_dir, tmp_path, capsys):
    from llmopt.cli import main

    out = tmp_path / "cli-onnx"
    assert (
        main(
            [
                "export",
                str(tiny_model_dir),
                "--to",
                "onnx",
                "--output",
                str(out),
                "--quant",
                "int4-rtn",
                "--block-size",
                "32",
                "--accuracy-level",
                "4",
            ]
        )
        == 0
    )
    assert "MatMulNBits" in capsys.readouterr().out
    assert main(["export", str(tiny_model_dir), "--to", "onnx", "--output", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: --output")


@pytest.mark.integration
def test_smollm2_onnx_f32_perplexity_equals_torch(tmp_path, wikitext_path):
    """The embedded model exported to ONNX float32: perplexity within 0.1% of torch on the same windows."""
    from llmopt.evaluation import evaluate

    out = tmp_path / "smollm2-onnx"
    export_onnx("bundled:smollm2", str(out))
    data = f"text:{wikitext_path}#0.5:1"
    onnx_r = evaluate(str(out), data=data, seq_len=512, max_windows=2, backend="onnx", threads=2, progress=False)
    torch_r = evaluate(
        "bundled:smollm2", data=data, seq_len=512, max_windows=2, backend="torch", threads=2, progress=False
    )
    assert onnx_r.tokens_scored == torch_r.tokens_scored
    assert abs(onnx_r.perplexity / torch_r.perplexity - 1) < 1e-3
