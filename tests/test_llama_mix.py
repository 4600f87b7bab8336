"""llama.cpp's file types as a quantization stage's format (``format: q4_k_m``, ``mixture: llama.cpp``): each
Linear in the type llama.cpp's quantizer gives it with an importance matrix, and ``--type auto`` of the folder
writes a file with exactly llama.cpp's tensor types, hence its size, whose quantized tensors hold the folder's
weights bit for bit.

Tiny random Llamas, 8 layers: ``w256`` (hidden 256, ffn 512, four query heads per KV head, a separate output
head: K-quants everywhere) and ``w192`` (hidden 192 = 96·2, ffn 512, tied embedding: rows of 192 are not whole
256-blocks, so llama.cpp's per-tensor fallbacks apply, K-quants only on ffn_down). The reference is llama.cpp's
own ``llama_model_quantize`` of the same weights with an importance matrix (its values do not change a type).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmopt.core.llama_mix import FILE_TYPES, candidate_types, gguf_names, linear_types
from llmopt.errors import LLMOptError

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.llamacpp

T = gguf.GGMLQuantizationType
MODELS = {"w256": (256, 512, 4, 1, False), "w192": (192, 512, 4, 2, True)}  # hidden, ffn, heads, kv heads, tied
LAYERS = 8


def _llama(vocab: int, hidden: int, ffn: int, heads: int, kv: int, tied: bool, layers: int = LAYERS):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_text_file):
    """name → (HF folder, its F32 GGUF)."""
    from llmopt.exporters import export_gguf
    from tests.conftest import make_tiny_tokenizer

    tok = make_tiny_tokenizer(tiny_text_file.read_text())
    out = {}
    for name, spec in MODELS.items():
        d = tmp_path_factory.mktemp(name)
        _llama(len(tok), *spec).save_pretrained(d / "hf")
        tok.save_pretrained(d / "hf")
        export_gguf(str(d / "hf"), str(d / "f32.gguf"), type="f32")
        out[name] = (d / "hf", d / "f32.gguf")
    return out


def _llama_cpp_file(f32, dst, ftype: str):
    """llama.cpp's own file of type ``ftype`` with an importance matrix (one entry makes it "with")."""
    from llmopt.exporters.gguf.plan import Plan
    from llmopt.exporters.gguf.quantize import llama_quantize

    width = next(int(t.shape[0]) for t in gguf.GGUFReader(f32).tensors if t.name == "blk.0.attn_k.weight")
    llama_quantize(f32, dst, Plan("llama", ftype, "", ""), {"blk.0.attn_k.weight": np.ones(width, np.float32)}, 1)
    return {t.name: t for t in gguf.GGUFReader(dst).tensors}


def _check_codes_bit_for_bit(folder, path) -> int:
    """Every Linear with stored codes: the GGUF tensor, dequantized by gguf-py, equals the folder's weight."""
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    from llmopt.exporters.gguf import unpermute_qk

    cfg = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    index = json.loads((folder / "quantization.json").read_text())
    for linear, entry in index.items():
        t = tensors[tmap.get_name(linear + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type.name == entry["gguf_type"], linear
        raw = np.asarray(t.data)
        heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}.get(linear[-6:])
        W = dequantize(unpermute_qk(raw, heads) if heads else raw, t.tensor_type)
        ref = weights[linear + ".weight"].numpy()
        assert np.array_equal(W.view(np.uint32), ref.view(np.uint32)), linear
    return len(index)


@pytest.mark.parametrize("model", list(MODELS))
def test_each_linear_gets_llama_cpps_type_in_every_mix(model, models, tmp_path):
    """What the stage follows: for every file type, the type :func:`linear_types` gives each Linear of the HF
    model is the type of its tensor in llama.cpp's file of the same weights (with an importance matrix)."""
    from transformers import AutoModelForCausalLM

    src, f32 = models[model]
    hf = AutoModelForCausalLM.from_pretrained(src)
    names = gguf_names(hf)
    wrong = []
    for ftype in FILE_TYPES:
        ref = _llama_cpp_file(f32, tmp_path / f"{ftype}.gguf", ftype)
        for linear, t in linear_types(hf, ftype).items():
            if names[linear] in ref and ref[names[linear]].tensor_type != t:
                wrong.append((ftype, linear, t, ref[names[linear]].tensor_type.name))
        (tmp_path / f"{ftype}.gguf").unlink()
    assert not wrong, wrong


@pytest.mark.parametrize(("model", "ftype"), [("w256", "q4_k_m"), ("w256", "q3_k_m"), ("w192", "q4_k_m"),
                                              ("w256", "iq4_xs"), ("w256", "q5_k_s")])  # fmt: skip
def test_mix_exports_llama_cpps_types_and_size_with_the_codes(model, ftype, models, tmp_path):
    """RTN with ``mixture: llama.cpp`` (the types depend only on the mix, not on how the codes were chosen),
    then ``--type auto``: the same tensors in the same types as llama.cpp's file (token embedding and output
    head included, from the file type the folder records), no more bytes (+1% at most: metadata), every
    coded tensor bit for bit the folder's weight."""
    from llmopt.compression import compress
    from llmopt.exporters import export_gguf

    src, f32 = models[model]
    ref_path, folder, out = tmp_path / "llama.gguf", tmp_path / ftype, tmp_path / f"{ftype}.gguf"
    ref = _llama_cpp_file(f32, ref_path, ftype)
    compress(str(src), {"stages": [{"stage": "rtn", "format": ftype, "mixture": "llama.cpp"}]}, folder)
    index = json.loads((folder / "quantization.json").read_text())
    assert {(e["llama_ftype"], e["llama_imatrix"]) for e in index.values()} == {(ftype, True)}
    report = export_gguf(str(folder), str(out), type="auto")
    got = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert set(got) == set(ref)
    assert {n: t.tensor_type.name for n, t in got.items()} == {n: t.tensor_type.name for n, t in ref.items()}
    assert sum(int(t.n_bytes) for t in got.values()) == sum(int(t.n_bytes) for t in ref.values())
    assert out.stat().st_size <= 1.01 * ref_path.stat().st_size
    assert _check_codes_bit_for_bit(folder, out) == 7 * LAYERS
    assert report["tensor_types"].get("F16") is None


def test_mix_types_on_the_fallback_model_are_llama_cpps_known_answers(models):
    """Read off llama-quant.cpp for the 192-wide model (n_layer 8, GQA 2): q4_k_m gives attn_v and ffn_down of
    layers 0, 3, 6, 7 (use_more_bits) Q6_K, whose 192-wide attn_v falls back to Q8_0; the other 192-wide rows
    Q5_0 (Q4_K's fallback); ffn_down, 512 wide, keeps its K-quant; iq4_xs falls back to IQ4_NL."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models["w192"][0])
    types = linear_types(model, "q4_k_m")
    more = {0, 3, 6, 7}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        assert types[p + "self_attn.v_proj"] == (T.Q8_0 if i in more else T.Q5_0), i
        assert types[p + "mlp.down_proj"] == (T.Q6_K if i in more else T.Q4_K), i
        for other in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert types[p + other] == T.Q5_0, (i, other)
    assert types["lm_head"] == T.Q8_0  # tied: the token embedding's type, Q6_K → Q8_0 for 192-wide rows
    iq4 = linear_types(model, "iq4_xs")
    assert {iq4[n] for n in iq4 if "down_proj" in n} == {T.IQ4_XS}
    assert {iq4[n] for n in iq4 if "down_proj" not in n} == {T.IQ4_NL, T.Q8_0}
    q4_0 = linear_types(model, "q4_0")  # the guard llmopt had as a special case: first n_layer/8 ffn_down
    assert {n for n, t in q4_0.items() if t == T.Q4_1} == {"model.layers.0.mlp.down_proj"}
    assert linear_types(model, "q4_0", imatrix=False)["model.layers.0.mlp.down_proj"] == T.Q4_0


def test_gptq_mix_writes_its_codes_in_llama_cpps_types(tiny_text_file, tmp_path):
    """GPTQ (the shipped recipe's settings) on the q4_k_m mix of a 4-layer, 192-wide model: each Linear in
    llama.cpp's type for it, the file llama.cpp's types and size, the codes bit for bit; a Linear pruned first
    keeps its zeros: its Q4_K (no exact 0) becomes Q4_0 (the same size), its Q6_K / Q5_0 / Q8_0 stay."""
    from llmopt.compression import compress
    from llmopt.exporters import export_gguf
    from tests.conftest import make_tiny_tokenizer

    tok = make_tiny_tokenizer(tiny_text_file.read_text())
    src = tmp_path / "src"
    _llama(len(tok), 192, 256, 4, 2, True, layers=4).save_pretrained(src)
    tok.save_pretrained(src)
    calib = {"data": f"text:{tiny_text_file}", "samples": 2, "seq_len": 32}
    stage = {"stage": "gptq", "format": "q4_k_m", "act_order": True, "static_groups": True, "mse_grid": 20}
    dense = compress(str(src), {"calibration": calib, "stages": [stage]}, tmp_path / "gptq").report
    sparse = [{"stage": "sparsegpt", "sparsity": 0.5}, stage]
    pruned = compress(str(src), {"calibration": calib, "stages": sparse}, tmp_path / "sparse").report
    f32, ref_path, out = tmp_path / "f32.gguf", tmp_path / "llama.gguf", tmp_path / "gptq.gguf"
    export_gguf(str(src), str(f32), type="f32")
    ref = _llama_cpp_file(f32, ref_path, "q4_k_m")
    export_gguf(str(tmp_path / "gptq"), str(out), type="auto")
    got = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert got == {n: t.tensor_type for n, t in ref.items()}
    assert out.stat().st_size <= 1.01 * ref_path.stat().st_size
    assert _check_codes_bit_for_bit(tmp_path / "gptq", out) == 7 * 4

    gptq = {r["linear"]: r for r in dense["linears"]}
    assert {r["format"] for r in gptq.values()} == {"q4_K", "q6_K", "q5_0", "q8_0"}
    assert all(r["llama_ftype"] == "q4_k_m" and r["loss"] > 0 for r in gptq.values())
    after = {r["linear"]: r for r in pruned["linears"] if r["stage"] == "gptq"}
    for n, r in after.items():
        assert r["format"] == {"q4_K": "q4_0"}.get(gptq[n]["format"], gptq[n]["format"]), n
        assert r["pruned_nonzero"] == 0 and r["sparsity"] >= 0.5, n
    export_gguf(str(tmp_path / "sparse"), str(tmp_path / "sparse.gguf"), type="auto")  # exact, the same size
    assert (tmp_path / "sparse.gguf").stat().st_size == pytest.approx(out.stat().st_size, rel=0.01)


def test_gguf_names_follow_gguf_py(tiny_text_file):
    """The GGUF tensor llama.cpp's rules see for each Linear: per architecture (gpt2's Conv1D c_proj is
    ffn_down in the MLP, attn_output in attention), per-expert Linears as their merged tensor, the shared
    expert, a tied head as the token embedding; a model type llama.cpp lacks through every architecture's names."""
    import transformers as tf

    from tests.tiny_archs import make_tiny_model

    gpt2 = gguf_names(make_tiny_model("gpt2", 64))
    assert gpt2["transformer.h.1.mlp.c_proj"] == "blk.1.ffn_down.weight"
    assert gpt2["transformer.h.1.attn.c_proj"] == "blk.1.attn_output.weight"
    assert gpt2["transformer.h.1.attn.c_attn"] == "blk.1.attn_qkv.weight"
    assert gpt2["lm_head"] == gpt2["transformer.wte"] == "token_embd.weight"
    opt = make_tiny_model("opt", 64)  # gguf-py names none of its Linears: llama.cpp's "other" tensors
    assert gguf_names(opt)["model.decoder.layers.2.fc2"] == "model.decoder.layers.2.fc2.weight"
    types = linear_types(opt, "q4_0")  # no ffn_down guard without an ffn_down; the tied head: Q6_K → Q8_0
    assert types.pop("lm_head") == T.Q8_0 and set(types.values()) == {T.Q4_0}
    llama = make_tiny_model("llama", 64)
    known = gguf_names(llama)
    llama.config.model_type = "my_llama"  # no llama.cpp architecture: the names of every architecture
    assert gguf_names(llama) == known and known["model.layers.2.self_attn.v_proj"] == "blk.2.attn_v.weight"
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=64)  # fmt: skip
    moe = tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, **{**small, "intermediate_size": 256}))
    names = gguf_names(moe)
    assert names["model.layers.1.block_sparse_moe.experts.3.w2"] == "blk.1.ffn_down_exps.weight"
    assert names["lm_head"] == "output.weight"
    types = linear_types(moe, "q4_k_m")  # one type for all experts of a layer; layer 1 of 2: use_more_bits
    for i, t in enumerate((T.Q4_K, T.Q6_K)):
        assert {types[f"model.layers.{i}.block_sparse_moe.experts.{j}.w2"] for j in range(4)} == {t}
    assert types["model.layers.0.block_sparse_moe.gate"] == T.Q5_0  # router: F32 in llama.cpp; Q4_K → Q5_0 here
    qwen = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(num_experts=4, moe_intermediate_size=64,
                                                    shared_expert_intermediate_size=64, **small))  # fmt: skip
    assert gguf_names(qwen)["model.layers.0.mlp.shared_expert.down_proj"] == "blk.0.ffn_down_shexp.weight"


def test_config_takes_file_type_names():
    from llmopt.recipe import parse_recipe

    def stage(**kw):
        return parse_recipe({"stages": [kw]}).stages[0]

    s = stage(stage="gptq", format="Q4_K_M")
    assert (s.format, s.file_type, s.make_format().name) == ("q4_k_m", "q4_k_m", "q4_K")
    assert stage(stage="rtn", format="q6_K").file_type is None  # RTN: mixture none by default
    assert stage(stage="rtn", format="q6_K", mixture="llama.cpp").file_type == "q6_k"
    assert stage(stage="gptq", format="q3_K").file_type is None  # a format, no llama.cpp file type
    assert stage(stage="gptq", format="int", bits=4).file_type is None
    for bad, msg in (
        ({"format": "q4_k_m", "mixture": "none"}, "set mixture: llama.cpp"),
        ({"format": "q4_k_m", "bits": 4}, "leave bits and group_size out"),
        ({"format": "q4_k_x"}, "llama.cpp file types: q4_0"),
        ({"format": "iq2_xxs"}, "iq4_xs"),
    ):
        with pytest.raises(LLMOptError) as e:
            stage(stage="gptq", **bad)
        assert msg in str(e.value) and "\n" not in str(e.value).strip(), bad


def test_a_row_no_block_fits_is_refused_before_any_work(tiny_text_file, tmp_path):
    """llama.cpp leaves a tensor whose rows fit no block (208 = 6.5·32) in F16; a quantization stage cannot,
    and says so in the pre-flight, naming the Linear."""
    from llmopt.compression import compress
    from tests.conftest import make_tiny_tokenizer

    tok = make_tiny_tokenizer(tiny_text_file.read_text())
    d = tmp_path / "w208"
    _llama(len(tok), 256, 208, 4, 1, True, layers=2).save_pretrained(d)
    tok.save_pretrained(d)
    with pytest.raises(LLMOptError, match=r"q4_k_m leaves model\.layers\.0\.mlp\.down_proj unquantized .*ignore"):
        compress(str(d), {"stages": [{"stage": "rtn", "format": "q4_k_m", "mixture": "llama.cpp"}]}, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_pipeline_baseline_and_onnx_refusal():
    """The baseline row of a mix recipe is llama.cpp's file of that type; ONNX export of a K-quant / IQ4 mix is
    refused before any work (MatMulNBits holds none of those blocks), a Q4_0 mix still passes (its q4_1
    Linears stay float32 in ONNX, as before)."""
    from llmopt.pipeline.options import PipelineOptions, baseline_type, check_recipe
    from llmopt.recipe import parse_recipe

    for ftype in ("q4_k_m", "q3_k_m", "iq4_xs", "q6_k"):
        recipe = parse_recipe(f"gptq-{ftype}")
        assert baseline_type(recipe) == ftype
        check_recipe(recipe, PipelineOptions(export=("gguf",)))
        with pytest.raises(LLMOptError, match=f"--export onnx cannot hold llama.cpp's {ftype} mix") as e:
            check_recipe(recipe, PipelineOptions(export=("gguf", "onnx")))
        assert "\n" not in str(e.value)
    check_recipe(parse_recipe("gptq-q4_0"), PipelineOptions(export=("gguf", "onnx")))
    assert baseline_type(parse_recipe({"stages": [{"stage": "rtn", "format": "q6_K"}]})) == "q6_k"
    assert candidate_types("q4_0") == {T.Q4_0, T.Q4_1, T.Q8_0}  # Q8_0: attn_v of 8-expert models
    assert candidate_types("q6_k") == {T.Q6_K, T.Q8_0}
