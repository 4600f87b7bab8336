"""The gptq stage's ``head``: the output head (the tied token embedding where tied) quantized by GPTQ after
the last decoder layer, with the Hessian of the final normed hidden states.

Properties: the head's codes reproduce the saved weight (and the tie survives saving and loading); the GGUF
holds them byte for byte (gguf-py's dequantization of token_embd / output equals the folder's weight); GPTQ's
head has a smaller output error ‖(W − Ŵ)X‖ and KL of the logits on the calibration states than llama.cpp's
round-to-nearest in the same format; the decoder's codes are exactly those of the same recipe without
``head``, which leaves the head and the embedding untouched; ONNX keeps the head float with its exact values.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmopt.errors import LLMOptError

gguf = pytest.importorskip("gguf")


def _recipe(text_file, head: str | None, fmt: str = "q4_0", stages: list | None = None) -> dict:
    stage = {"stage": "gptq", "format": fmt}
    if head is not None:
        stage["head"] = head
    calib = {"data": f"text:{text_file}", "samples": 8, "seq_len": 64}
    return {"calibration": calib, "stages": [stage, *(stages or [])]}


def _tiny(tmp_path, text_file, tied: bool, hidden: int = 64):
    from tests.conftest import make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer(text_file.read_text())
    model = make_tiny_llama(len(tok), hidden=hidden)
    if not tied:  # an output head of its own, scaled like the decoder's Linears
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.15)
    d = tmp_path / ("tied" if tied else "untied")
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def _head_inputs(folder, original, text_file) -> torch.Tensor:
    """X: (tokens, hidden) the head's input on the calibration windows, as the engine saw it: the compressed
    decoder with the *original* token embedding (a tied head's quantization changes it after calibration)."""
    from llmopt.data import calibration_windows
    from llmopt.models import load_model

    loaded = load_model(str(folder))
    model = loaded.model
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(original)
    windows = calibration_windows(f"text:{text_file}", loaded.tokenizer, 8, 64, 0, model=model)
    xs = []
    head = model.get_output_embeddings()
    h = head.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    h.remove()
    return torch.cat(xs)


def _output_error(W: torch.Tensor, Wq: torch.Tensor, X: torch.Tensor) -> tuple[float, float]:
    """(‖(W − Ŵ) Xᵀ‖², mean KL(softmax(W x) ‖ softmax(Ŵ x))) over the tokens of X."""
    ref, got = X @ W.t(), X @ Wq.t()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    return float((ref - got).square().sum()), float(kl)


def _gguf_tensor(path, name: str) -> tuple[np.ndarray, object]:
    t = {t.name: t for t in gguf.GGUFReader(path).tensors}.get(name)
    assert t is not None, name
    return gguf.quants.dequantize(t.data, t.tensor_type), t.tensor_type


@pytest.mark.parametrize("tied,head", [(True, "q4_0"), (False, "auto")])
def test_gptq_head_codes_gguf_and_error(tiny_text_file, tmp_path, tied, head):
    from safetensors.torch import load_file

    from llmopt.compression import compress
    from llmopt.exporters import export_gguf
    from llmopt.exporters.gguf.codes import load_stored
    from llmopt.formats import make_format, rtn_quantize
    from llmopt.models import load_model

    src = _tiny(tmp_path, tiny_text_file, tied)
    original = load_file(str(src / "model.safetensors"))
    W = original["model.embed_tokens.weight" if tied else "lm_head.weight"]
    with_head, without = tmp_path / "head", tmp_path / "plain"
    report = compress(str(src), _recipe(tiny_text_file, head), with_head).report
    compress(str(src), _recipe(tiny_text_file, None), without)

    fmt_name = "q4_0" if tied else "q8_0"  # auto on a 64-wide untied head in a Q4_0 file: Q6_K → Q8_0
    entry = json.loads((with_head / "quantization.json").read_text())["lm_head"]
    assert entry["format"] == fmt_name and entry["head"] is True
    assert entry["tied_to"] == ("model.embed_tokens" if tied else None)
    (line,) = [r for r in report["linears"] if r["linear"] == "lm_head"]
    assert line["head"] is True and line["shape"] == list(W.shape) and line["calibration_tokens"] == 8 * 64

    # the codes reproduce the saved weight; a tied folder keeps one tensor, and loading ties it again
    saved = load_file(str(with_head / "model.safetensors"))
    stored = load_stored(with_head)
    deq = stored["lm_head"].dequantize()
    assert torch.equal(deq, saved["model.embed_tokens.weight" if tied else "lm_head.weight"])
    assert ("lm_head.weight" in saved) != tied
    model = load_model(str(with_head)).model
    assert torch.equal(model.lm_head.weight, deq)
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert torch.equal(model.model.embed_tokens.weight, original["model.embed_tokens.weight"])

    # without head: the head and embedding untouched, no entry; the decoder's codes identical either way
    plain = load_file(str(without / "model.safetensors"))
    assert "lm_head" not in json.loads((without / "quantization.json").read_text())
    assert torch.equal(plain["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    plain_stored = load_stored(without)
    assert set(stored) == set(plain_stored) | {"lm_head"}
    for name, s in plain_stored.items():
        assert torch.equal(s.codes, stored[name].codes) and torch.equal(s.qp.scale, stored[name].qp.scale), name

    # GGUF --type auto: token_embd (tied) / output (untied) from the codes, byte for byte
    out = tmp_path / "head.gguf"
    export_gguf(str(with_head), str(out), type="auto")
    tensor = "token_embd.weight" if tied else "output.weight"
    got, qtype = _gguf_tensor(out, tensor)
    assert qtype.name == fmt_name.upper()
    assert np.array_equal(got.reshape(deq.shape).view(np.int32), deq.numpy().view(np.int32))
    blocks = make_format(fmt_name).to_gguf_blocks(stored["lm_head"].codes, stored["lm_head"].qp)
    raw = {t.name: t for t in gguf.GGUFReader(out).tensors}[tensor]
    assert np.array_equal(np.asarray(raw.data).reshape(blocks.shape), blocks)
    if not tied:  # the embedding stays llama.cpp's own choice (Q4_0 in a Q4_0 file), from the original weights
        emb, _ = _gguf_tensor(out, "token_embd.weight")
        rtn = rtn_quantize(original["model.embed_tokens.weight"], make_format("q4_0")).weight
        assert np.array_equal(emb.reshape(rtn.shape), rtn.numpy())

    # GPTQ's head beats llama.cpp's round-to-nearest in the same format on the calibration states
    X = _head_inputs(with_head, original["model.embed_tokens.weight"], tiny_text_file)
    rtn = rtn_quantize(W, make_format(fmt_name)).weight
    g_err, g_kl = _output_error(W, deq, X)
    r_err, r_kl = _output_error(W, rtn, X)
    assert g_err < 0.9 * r_err and g_kl < r_kl, (g_err, r_err, g_kl, r_kl)
    # the report's loss is tr((W − Ŵ) H (W − Ŵ)ᵀ) with H = 2/N XᵀX
    assert line["loss"] == pytest.approx(2 * g_err / X.shape[0], rel=1e-3)


def test_head_onnx_keeps_exact_float_head(tiny_text_file, tmp_path):
    """ONNX ``--quant auto`` writes the decoder's codes as MatMulNBits and keeps the quantized tied head float32
    (its exact values): ONNX Runtime's logits equal torch's on the folder."""
    pytest.importorskip("onnxruntime")
    from llmopt.backends.onnx_backend import OnnxBackend
    from llmopt.compression import compress
    from llmopt.exporters import export_onnx
    from llmopt.models import load_model

    src = _tiny(tmp_path, tiny_text_file, True)
    folder = tmp_path / "head"
    compress(str(src), _recipe(tiny_text_file, "q4_0"), folder)
    report = export_onnx(str(folder), str(tmp_path / "onnx"), quant="auto")
    assert report["head_float"] == ["lm_head"] and report["linears_exact"] == report["matmul_nbits"] == 14
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_model(str(folder)).model(ids).logits[0]
    got = OnnxBackend(tmp_path / "onnx", threads=1).logits(ids[0])
    assert float((got - ref).abs().max()) <= 1e-4


def test_head_bfloat16_model_keeps_the_tie_in_float32(tiny_text_file, tmp_path):
    """A bfloat16 model saves its quantized Linears in float32 (code × scale exactly): the tied head and the
    embedding stay one float32 tensor."""
    from safetensors.torch import load_file

    from llmopt.compression import compress
    from llmopt.exporters.gguf.codes import load_stored

    src = _tiny(tmp_path, tiny_text_file, True)
    folder = tmp_path / "bf16"
    compress(str(src), _recipe(tiny_text_file, "q8_0"), folder, dtype="bfloat16")
    saved = load_file(str(folder / "model.safetensors"))
    assert "lm_head.weight" not in saved and saved["model.embed_tokens.weight"].dtype == torch.float32
    assert saved["model.norm.weight"].dtype == torch.bfloat16
    assert torch.equal(saved["model.embed_tokens.weight"], load_stored(folder)["lm_head"].dequantize())


def test_head_setting_is_validated():
    from llmopt.recipe import parse_recipe

    stage = parse_recipe({"stages": [{"stage": "gptq", "format": "q4_0", "head": "Q8_0"}]}).stages[0]
    assert stage.head == "q8_0"
    assert parse_recipe({"stages": [{"stage": "gptq", "format": "q4_0"}]}).stages[0].head == "none"
    with pytest.raises(LLMOptError, match="unknown head format 'q3'; valid: none, auto, "):
        parse_recipe({"stages": [{"stage": "gptq", "format": "q4_0", "head": "q3"}]})
    with pytest.raises(LLMOptError, match="head: auto .* 'int' is no llama.cpp file type"):
        parse_recipe({"stages": [{"stage": "gptq", "format": "int", "bits": 4, "head": "auto"}]})
    with pytest.raises(LLMOptError, match="unknown key 'head' in stage 1 \\(rtn\\)"):
        parse_recipe({"stages": [{"stage": "rtn", "format": "q4_0", "head": "q8_0"}]})


def test_head_before_a_whole_model_stage_is_refused(tiny_model_dir, tiny_text_file, tmp_path):
    from llmopt.compression import compress

    recipe = _recipe(tiny_text_file, "q8_0", stages=[{"stage": "distill", "max_tokens": 64}])
    with pytest.raises(LLMOptError, match=r"stage 1 \(gptq\) quantizes the output head and a later stage \(distill\)"):
        compress(str(tiny_model_dir), recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_head_auto_is_llama_cpps_output_type(tiny_text_file, tmp_path):
    """``auto``: the output type of llama.cpp's quantizer for the stage's file type: Q8_0 for a Q8_0 file and
    for rows that are no multiple of 256 (Q6_K's fallback); Q6_K on 256-wide rows (refused while llmopt has
    no q6_K format, naming what to write instead)."""
    from llmopt.formats import GGUF_FORMATS
    from llmopt.stages.quantization import head_format
    from tests.conftest import make_tiny_llama

    m64 = make_tiny_llama(320, hidden=64)
    assert head_format("auto", "q4_0", m64.lm_head, True, m64).name == "q8_0"
    assert head_format("auto", "q8_0", m64.lm_head, True, m64).name == "q8_0"
    assert head_format("q5_0", "q4_0", m64.lm_head, True, m64).name == "q5_0"
    m256 = make_tiny_llama(320, hidden=256, layers=1)
    q6 = next((n for n in GGUF_FORMATS if n.lower() == "q6_k"), None)
    if q6 is not None:
        assert head_format("auto", "q4_0", m256.lm_head, False, m256).name == q6
    else:
        with pytest.raises(LLMOptError, match="head: auto is Q6_K for a Q4_0 file .* name the head's format"):
            head_format("auto", "q4_0", m256.lm_head, False, m256)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gemma2", "gemma3", "gpt2", "opt"])
def test_head_statistics_are_the_models_own_head_inputs(arch):
    """The engine's head statistics (the model's tail replayed on the last layer's outputs: Llama's and Gemma's
    final norms, GPT-2's ln_f, OPT's final_layer_norm) equal the Hessian of the inputs the
    head receives in the model's own forward; the layers are intact afterwards."""
    from llmopt.calibration import LayerSource, capture_layer_inputs, find_decoder_layers, iterate_layers
    from llmopt.calibration.head import head_statistics, output_head
    from tests.tiny_archs import make_tiny_model

    model = make_tiny_model(arch, 320)
    windows = torch.randint(3, 320, (5, 24), generator=torch.Generator().manual_seed(0))
    name, head, tied_to = output_head(model)
    assert name == "lm_head" and tied_to in ("model.embed_tokens", "transformer.wte", "model.decoder.embed_tokens")
    xs = []
    h = head.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits
    h.remove()
    X = torch.cat(xs)
    prefix, layers = find_decoder_layers(model)
    batches = capture_layer_inputs(model, layers, windows, batch_size=2)  # 3 batches: 2 + 2 + 1 windows
    for _ in iterate_layers(LayerSource(layers, prefix), batches, "test", last_outputs=True):
        pass
    stats = head_statistics(model, layers, windows, batches, 2, name, head)
    assert stats.tokens == X.shape[0] == 5 * 24
    torch.testing.assert_close(stats.hessian, 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-5)
    assert all("forward" not in vars(layer) for layer in layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=windows, use_cache=False).logits, logits)
