"""The calibration engine and compress → save → reload on every architecture of the test matrix.

Tiny random models built offline (tests/tiny_archs.py): llama, mistral, qwen2, qwen3, phi3, gemma2,
gemma3, gpt2 (Conv1D), opt. Each case takes well under a second.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from llmopt.calibration import call_order_groups, capture_layer_inputs, find_decoder_layers, iterate_layers
from llmopt.compression import compress
from llmopt.formats import QParams, make_format
from llmopt.linears import is_linear, weight_oi
from llmopt.models import load_model
from tests.conftest import make_tiny_tokenizer, synthetic_text
from tests.tiny_archs import ARCHS, WINDOW, make_tiny_model, save_tiny_model

SEQ = 4 * WINDOW  # calibration windows longer than the sliding window, so per-layer masks matter


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer(synthetic_text())


@pytest.fixture(scope="module")
def text_spec(tmp_path_factory):
    p = tmp_path_factory.mktemp("archs-data") / "text.txt"
    p.write_text(synthetic_text(6000, seed=3))
    return f"text:{p}"


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, tokenizer):
    """arch → saved tiny model folder (built lazily, once per module)."""
    cache: dict[str, object] = {}

    def get(arch: str):
        if arch not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{arch}")
            save_tiny_model(arch, d, tokenizer)
            cache[arch] = d
        return cache[arch]

    return get


def _windows(tokenizer, n=4, seq=SEQ):
    ids = tokenizer(synthetic_text(3000, seed=7), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: n * seq]).view(n, seq)


# --------------------------------------------------------------------------------------------------
# Engine: layer inputs and per-layer arguments


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_reproduces_every_layer_input(arch, tokenizer):
    """Propagating the captured inputs layer by layer (no compression) gives exactly the hidden states
    the model computes itself, at every layer. With a mask captured once at layer 0 (the old engine),
    the sliding-window layers of gemma2/gemma3/qwen2/mistral got the wrong mask beyond the window."""
    model = make_tiny_model(arch, len(tokenizer))
    windows = _windows(tokenizer)
    with torch.no_grad():
        ref = model(input_ids=windows, output_hidden_states=True, use_cache=False).hidden_states
    prefix, layers = find_decoder_layers(model)
    from llmopt.calibration import LayerSource

    batches = capture_layer_inputs(model, layers, windows, batch_size=3)  # 2 batches: 3 + 1 windows
    assert [b.hidden.shape[0] for b in batches] == [3, 1]
    for i, _layer in iterate_layers(LayerSource(layers, prefix), batches, "test"):
        got = torch.cat([b.hidden for b in batches])
        torch.testing.assert_close(got, ref[i], rtol=1e-5, atol=1e-5, msg=f"{arch} layer {i} input")
    # the model's layers are intact afterwards (the capture bypass is undone)
    with torch.no_grad():
        again = model(input_ids=windows, use_cache=False).logits
        assert torch.equal(again, model(input_ids=windows, use_cache=False).logits)
    assert all("forward" not in vars(layer) for layer in layers)


def test_per_layer_masks_differ_where_the_model_says(tokenizer):
    """Gemma 2 alternates sliding-window and full attention: the captured masks alternate too."""
    model = make_tiny_model("gemma2", len(tokenizer))
    _, layers = find_decoder_layers(model)
    (batch,) = capture_layer_inputs(model, layers, _windows(tokenizer, n=2), batch_size=8)
    masks = [batch.layer_args[i][1].get("attention_mask") for i in range(len(layers))]
    kinds = [layer.attention_type for layer in layers]
    assert kinds[0] != kinds[1]
    assert masks[0] is masks[2] and masks[0] is not masks[1]
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("llama", [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
        ("phi3", [["qkv_proj"], ["o_proj"], ["gate_up_proj"], ["down_proj"]]),
        ("gpt2", [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]),
        ("opt", [["q_proj", "k_proj", "v_proj"], ["out_proj"], ["fc1"], ["fc2"]]),
        ("gemma2", [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
    ],
)
def test_true_sequential_groups_follow_call_order(arch, expected, tokenizer):
    model = make_tiny_model(arch, len(tokenizer))
    prefix, layers = find_decoder_layers(model)
    batches = capture_layer_inputs(model, layers, _windows(tokenizer, n=2), batch_size=8)
    linears = {f"{prefix}.1.{n}": m for n, m in layers[1].named_modules() if is_linear(m)}
    # shuffled dict order: the groups come from the forward, not from the names
    linears = dict(reversed(list(linears.items())))
    groups = call_order_groups(layers[1], linears, batches[0], 1)
    short = [[n.split(".", 3)[-1] if arch != "gpt2" else ".".join(n.split(".")[-2:]) for n in g] for g in groups]
    short = [[n.split(".")[-1] if arch != "gpt2" else n for n in g] for g in short]
    assert short == expected


# --------------------------------------------------------------------------------------------------
# compress → save → reload, every architecture, three recipes, true-sequential on and off

RECIPES = {
    "sparsegpt-50": {"stage": "sparsegpt", "sparsity": 0.5},
    "gptq-w4g64": {"stage": "gptq", "format": "int", "bits": 4, "group_size": 64},
    "gptq-q4_0": {"stage": "gptq", "format": "q4_0"},
}


def _target_weights(folder) -> dict[str, torch.Tensor]:
    """Decoder-layer Linear weights of a saved folder as (out, in) float32, by module name."""
    model = load_model(str(folder), dtype="float32").model
    prefix, _ = find_decoder_layers(model)
    return {
        n: weight_oi(m).float().clone() for n, m in model.named_modules() if is_linear(m) and n.startswith(prefix + ".")
    }


@pytest.mark.parametrize("true_sequential", [False, True], ids=["layerwise", "true-seq"])
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("arch", ARCHS)
def test_compress_save_reload(arch, recipe, true_sequential, arch_dirs, text_spec, tmp_path):
    src = arch_dirs(arch)
    rec = {
        "calibration": {"data": text_spec, "samples": 8, "seq_len": SEQ, "true_sequential": true_sequential},
        "stages": [RECIPES[recipe]],
    }
    res = compress(str(src), rec, tmp_path / "out")
    out = tmp_path / "out"
    assert res.report["true_sequential"] is true_sequential
    assert "true_sequential: " + str(true_sequential).lower() in (out / "recipe.yaml").read_text()
    weights = _target_weights(out)
    assert weights, "no decoder Linear found"
    reported = {r["linear"] for r in res.report["linears"]}
    assert reported == set(weights), "every decoder Linear is compressed exactly once"
    if recipe.startswith("sparsegpt"):
        for name, W in weights.items():
            assert (W == 0).float().mean().item() == pytest.approx(0.5, abs=1 / W.shape[1]), name
    else:
        index = json.loads((out / "quantization.json").read_text())
        q = load_file(str(out / "quantization.safetensors"))
        assert set(index) == set(weights)
        for name, W in weights.items():
            e = index[name]
            fmt = make_format(e["format"], e["bits"], e["group_size"], e["symmetric"])
            deq = fmt.dequantize(q[f"{name}.codes"], QParams(q[f"{name}.scale"], q[f"{name}.zero"]))
            assert torch.equal(deq, W), f"{name}: saved weight is not code x scale"
            assert e["transposed"] is (arch == "gpt2")
    # the reloaded model runs, and it is the compressed model (its logits moved away from the original's)
    ids = torch.arange(1, 2 * SEQ).view(1, -1) % 300 + 3
    with torch.no_grad():
        base = load_model(str(src)).model(input_ids=ids).logits.log_softmax(-1)
        comp = load_model(str(out)).model(input_ids=ids).logits.log_softmax(-1)
    kl = (base.exp() * (base - comp)).sum(-1).mean().item()
    assert torch.isfinite(comp).all() and kl > 0, f"{arch} {recipe}: KL {kl}"


def test_gptq_beats_rtn_on_gpt2_conv1d(arch_dirs, text_spec, tmp_path):
    """Conv1D weights go through the kernels in (out, in) layout: GPTQ's layer loss is below RTN's."""
    src = arch_dirs("gpt2")
    cal = {"data": text_spec, "samples": 8, "seq_len": SEQ}
    g = compress(str(src), {"calibration": cal, "stages": [RECIPES["gptq-w4g64"]]}, tmp_path / "g").report
    r = compress(str(src), {"calibration": cal, "stages": [{**RECIPES["gptq-w4g64"], "stage": "rtn"}]}, tmp_path / "r")
    assert {x["linear"] for x in g["linears"]} == {x["linear"] for x in r.report["linears"]}
    # the same saved folders evaluated on calibration-like data: GPTQ closer to the original than RTN
    ids = _windows(make_tiny_tokenizer(synthetic_text()), n=2)
    with torch.no_grad():
        base = load_model(str(src)).model(input_ids=ids).logits.log_softmax(-1)
        kls = []
        for d in ("g", "r"):
            comp = load_model(str(tmp_path / d)).model(input_ids=ids).logits.log_softmax(-1)
            kls.append((base.exp() * (base - comp)).sum(-1).mean().item())
    assert kls[0] < kls[1], kls


# --------------------------------------------------------------------------------------------------
# dtypes


def test_bfloat16_stays_bfloat16_and_quantized_weights_stay_exact(tokenizer, text_spec, tmp_path):
    src = tmp_path / "bf16"
    model = make_tiny_model("llama", len(tokenizer)).to(torch.bfloat16)
    model.save_pretrained(src, safe_serialization=True)
    tokenizer.save_pretrained(src)
    rec = {"calibration": {"data": text_spec, "samples": 4, "seq_len": SEQ}, "stages": [RECIPES["gptq-q4_0"]]}
    res = compress(str(src), rec, tmp_path / "out")  # --dtype auto: the checkpoint's bfloat16
    assert res.report["dtype"] == "bfloat16"
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    q = load_file(str(tmp_path / "out" / "quantization.safetensors"))
    fmt = make_format("q4_0")
    quantized = {k.removesuffix(".codes") for k in q if k.endswith(".codes")}
    assert quantized
    for k, t in saved.items():
        name = k.removesuffix(".weight")
        if name in quantized:  # float32, equal to code x scale bit for bit
            assert t.dtype == torch.float32, k
            deq = fmt.dequantize(q[f"{name}.codes"], QParams(q[f"{name}.scale"], q[f"{name}.zero"]))
            assert torch.equal(t, deq), k
        else:
            assert t.dtype == torch.bfloat16, k
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    # an explicit float32 run keeps everything float32
    res32 = compress(str(src), rec, tmp_path / "out32", dtype="float32")
    assert res32.report["dtype"] == "float32"
    assert {t.dtype for t in load_file(str(tmp_path / "out32" / "model.safetensors")).values()} == {torch.float32}


def test_unknown_dtype_is_one_line_error(arch_dirs, tmp_path):
    from llmopt.errors import LLMOptError

    with pytest.raises(LLMOptError, match="valid: auto, float32, bfloat16, float16"):
        compress(
            str(arch_dirs("llama")), {"stages": [{"stage": "rtn", "format": "q8_0"}]}, tmp_path / "o", dtype="int8"
        )


# --------------------------------------------------------------------------------------------------
# Linears that never run on the calibration data


def test_unrouted_experts_fall_back_to_data_free_kernels(tokenizer, text_spec, tmp_path, caplog):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=16,
        num_experts_per_tok=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = MixtralForCausalLM(cfg).eval()
    src = tmp_path / "moe"
    model.save_pretrained(src, safe_serialization=True)
    tokenizer.save_pretrained(src)
    rec = {
        "calibration": {"data": text_spec, "samples": 1, "seq_len": 4},
        "stages": [{"stage": "sparsegpt", "sparsity": 0.5}, {"stage": "gptq", "format": "q4_0"}],
    }
    with caplog.at_level(logging.WARNING, logger="llmopt.calibration"):
        res = compress(str(src), rec, tmp_path / "out")
    linears = res.report["linears"]
    pruned = {r["linear"]: r for r in linears if r["stage"] == "sparsegpt"}
    quant = {r["linear"]: r for r in linears if r["stage"] == "gptq"}
    assert set(pruned) == set(quant)
    fallback = [n for n, r in pruned.items() if r.get("fallback")]
    # 4 tokens route to at most 4 of 16 experts per layer: most experts never ran
    assert len(fallback) >= 2 * 3 * 12 and len(fallback) < len(pruned)
    for n in fallback:
        assert pruned[n]["fallback"] == "magnitude" and quant[n]["fallback"] == "rtn"
        assert pruned[n]["sparsity"] == pytest.approx(0.5, abs=0.02)
        assert quant[n]["sparsity"] == pytest.approx(pruned[n]["sparsity"])  # q4_0 keeps the pruned zeros
    assert all("fallback" not in r for n, r in quant.items() if n not in fallback)
    assert any(fallback[0] in m for m in caplog.messages)
