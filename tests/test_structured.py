"""Structured pruning (issue #12): the cut model equals the original with the removed channels, heads
and layers zeroed, its config has the requested sizes, GQA groups and tied embeddings stay consistent,
and it goes through the rest of a recipe (GPTQ q4_0, distill) and the exporters."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from llmopt.errors import LLMOptError
from llmopt.kernels.structured import block_influence, group_scores, head_channels, heads_to_groups, keep_top
from llmopt.structured import measure, plan_cut, prune
from llmopt.structured.config import StructuredConfig
from llmopt.structured.layout import non_embedding_params, sizes_of
from tests.conftest import make_tiny_tokenizer
from tests.tiny_archs import make_tiny_model

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
VOCAB = 300
TOL = 1e-4  # float32: the cut model and the zeroed original differ only in summation order


def cfg(**kw) -> StructuredConfig:
    """The surgery tests rank depth by Block Influence (one pass, known before the cut); the greedy loss
    ranking (the default) has its own tests below."""
    return StructuredConfig(stage="structured", **{"depth_ranking": "block_influence", **kw})


def tiny(arch: str, seed: int = 0, tied: bool = True):
    """A tiny model with random (positive) norm weights, so the RMSNorm rescaling is exercised."""
    m = make_tiny_model(arch, VOCAB, seed=seed, sliding=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
        if not tied:
            m.config.tie_word_embeddings = False
            m.lm_head.weight = torch.nn.Parameter(torch.randn(m.lm_head.weight.shape, generator=g) * 0.5)
    return m


def windows(n: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def zeroed_reference(model, imp, c: StructuredConfig):
    """The original model with everything the cut removes set to zero (no shapes change)."""
    from llmopt.structured.layout import check_supported
    from llmopt.structured.plan import target_sizes

    ref = copy.deepcopy(model)
    s = sizes_of(model)
    t = target_sizes(c, s, check_supported(model))
    body = ref.model
    with torch.no_grad():
        for i, layer in enumerate(body.layers):
            if t.intermediate < s.intermediate:
                keep = keep_top(imp.mlp[i], t.intermediate)
                drop = torch.ones(s.intermediate, dtype=torch.bool)
                drop[keep] = False
                layer.mlp.down_proj.weight[:, drop] = 0
            if t.kv_heads < s.kv_heads:
                q = head_channels(heads_to_groups(keep_top(imp.groups[i], t.kv_heads), s.heads_per_group), s.head_dim)
                drop = torch.ones(s.heads * s.head_dim, dtype=torch.bool)
                drop[q] = False
                layer.self_attn.o_proj.weight[:, drop] = 0
        if t.hidden < s.hidden:
            drop = torch.ones(s.hidden, dtype=torch.bool)
            drop[keep_top(imp.hidden, t.hidden)] = False
            body.embed_tokens.weight[:, drop] = 0
            for layer in body.layers:
                layer.self_attn.o_proj.weight[drop, :] = 0
                layer.mlp.down_proj.weight[drop, :] = 0
                layer.input_layernorm.weight[drop] = 0
                layer.post_attention_layernorm.weight[drop] = 0
            body.norm.weight[drop] = 0
        if t.layers < s.layers:
            keep = set(keep_top(imp.block_influence, t.layers).tolist())
            for i, layer in enumerate(body.layers):
                if i not in keep:  # o and down zero: the block adds nothing to the residual stream
                    layer.self_attn.o_proj.weight.zero_()
                    layer.mlp.down_proj.weight.zero_()
    return ref, t


# ---- kernels -------------------------------------------------------------------------------------------


def test_keep_top_is_sorted_and_stable():
    s = torch.tensor([0.5, 2.0, 0.5, 3.0, 0.1])
    assert keep_top(s, 2).tolist() == [1, 3]
    assert keep_top(s, 3).tolist() == [0, 1, 3]  # a tie goes to the lower index
    with pytest.raises(ValueError):
        keep_top(s, 0)


def test_group_and_channel_indices_follow_repeat_kv():
    # 6 query heads over 2 K/V heads: group g serves query heads 3g..3g+2 (transformers' repeat_kv)
    assert heads_to_groups(torch.tensor([1]), 3).tolist() == [3, 4, 5]
    assert head_channels(torch.tensor([0, 2]), 2).tolist() == [0, 1, 4, 5]
    assert group_scores(torch.tensor([1.0, 2, 3, 4, 5, 6]), 2).tolist() == [6.0, 15.0]


def test_block_influence_is_one_minus_cosine():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert block_influence(x, x).item() == pytest.approx(0.0, abs=1e-12)
    y = torch.tensor([[0.0, 1.0], [-1.0, -1.0]])  # orthogonal, opposite
    assert block_influence(x, y).item() == pytest.approx(1.0 + 2.0)


def test_parameter_count_formula_matches_the_modules():
    for arch in ARCHS:
        m = tiny(arch)
        flags = {"qkv_bias": arch == "qwen2", "qk_norm": arch == "qwen3"}
        emb = m.model.embed_tokens.weight.numel()
        assert sum(p.numel() for p in m.parameters()) - emb == non_embedding_params(sizes_of(m), **flags), arch


# ---- the cut equals zeroing ------------------------------------------------------------------------------

ALL_AXES = dict(intermediate_size=64, num_attention_heads=2, hidden_size=48, num_layers=2, round_to=16)


@pytest.mark.parametrize("arch", ARCHS)
def test_cut_equals_zeroing_all_axes(arch):
    model = tiny(arch)
    ids = windows(2, 40, seed=1)
    imp = measure(model, windows(), batch_size=4, progress=False)
    c = cfg(**ALL_AXES)
    ref, t = zeroed_reference(model, imp, c)
    original = logits(model, ids)
    report = prune(model, c, imp)
    cc = model.config
    assert (cc.intermediate_size, cc.num_attention_heads, cc.num_key_value_heads) == (64, 2, 1)
    assert (cc.hidden_size, cc.num_hidden_layers, cc.head_dim) == (48, 2, 16)
    assert len(model.model.layers) == 2 and report["after"]["layers"] == 2
    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        assert a.layer_idx == i
        assert a.q_proj.weight.shape == (2 * 16, 48) and a.k_proj.weight.shape == (1 * 16, 48)
        assert a.v_proj.weight.shape == (16, 48) and a.o_proj.weight.shape == (48, 32)
        assert a.num_key_value_groups == cc.num_attention_heads // cc.num_key_value_heads  # GQA ratio kept
        assert layer.mlp.down_proj.weight.shape == (48, 64)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    got, want = logits(model, ids), logits(ref, ids)
    assert (got - want).abs().max().item() < TOL * want.abs().max().item(), (got - want).abs().max()
    assert (got - original).abs().max().item() > 0.05 * want.abs().max().item()  # the cut did change the model
    assert report["non_embedding_params_after"] == sum(p.numel() for p in model.parameters()) - 48 * VOCAB


@pytest.mark.parametrize(
    "axis,kw,check",
    [
        ("mlp", dict(intermediate_size=0.5, round_to=16), lambda c: c.intermediate_size == 64),
        ("heads", dict(num_attention_heads=0.5), lambda c: (c.num_attention_heads, c.num_key_value_heads) == (2, 1)),
        ("hidden", dict(hidden_size=32), lambda c: c.hidden_size == 32 and c.head_dim == 16),
        ("depth", dict(num_layers=1), lambda c: c.num_hidden_layers == 1),
    ],
)
def test_each_axis_alone_untied(axis, kw, check):
    model = tiny("llama", seed=3, tied=False)
    ids = windows(2, 40, seed=2)
    imp = measure(model, windows(), progress=False)
    c = cfg(**kw)
    ref, _ = zeroed_reference(model, imp, c)
    prune(model, c, imp)
    assert check(model.config)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    got, want = logits(model, ids), logits(ref, ids)
    assert (got - want).abs().max().item() < TOL * want.abs().max().item()


def test_layers_with_least_block_influence_go():
    model = tiny("llama")
    imp = measure(model, windows(), progress=False)
    report = prune(model, cfg(num_layers=2), imp)
    bi = imp.block_influence
    assert report["removed_layers"] == [int(bi.argmin())]


def _brute_force_greedy(model, ids, n_keep):
    """Greedy removal by full forwards of the model with layers left out (no reuse of hidden states)."""
    body, kept, losses = model.model, list(range(len(model.model.layers))), []
    full = body.layers
    while len(kept) > n_keep:
        trial = []
        for i in kept:
            body.layers = torch.nn.ModuleList([full[j] for j in kept if j != i])
            with torch.no_grad():
                trial.append((model(input_ids=ids, labels=ids, use_cache=False).loss.item(), i))
        body.layers = full
        loss, i = min(trial, key=lambda t: t[0])  # the first of equal losses: the lower index
        kept.remove(i)
        losses.append(loss)
    return kept, losses


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_depth_equals_removal_by_full_forwards(arch):
    """The greedy ranking's reuse of hidden states (each candidate runs only the layers after it) gives the
    layers and losses that full forwards of the model with those layers left out give."""
    from llmopt.structured.depth import greedy_layers

    model = tiny(arch)
    while (L := len(model.model.layers)) < 4:  # 4 layers, the added ones perturbed copies
        model.model.layers.append(copy.deepcopy(model.model.layers[L - 1]))
        with torch.no_grad():
            for p in model.model.layers[L].parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(L)))
    model.config.num_hidden_layers = 4
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    ids = windows(8, 32)
    got, got_losses = greedy_layers(model, ids, 2, batch_size=3, progress=False)
    want, want_losses = _brute_force_greedy(model, ids, 2)
    assert got == want
    assert got_losses == pytest.approx(want_losses, rel=1e-5)


def test_depth_ranked_by_loss_on_the_width_cut_model():
    """The default ranking: prune cuts the widths first, then removes the layers the greedy loss picks on
    that model, and records them in the cut (which reconstruction reads)."""
    from llmopt.structured.depth import greedy_layers

    model = tiny("llama")
    imp = measure(model, windows(), progress=False)
    c = StructuredConfig(stage="structured", intermediate_size=64, num_layers=1, round_to=16)
    assert c.depth_ranking == "loss"
    cut, _ = plan_cut(model, c, imp)
    assert cut.layers is None and cut.layers_by_loss == 1
    widths_only = copy.deepcopy(model)
    prune(widths_only, StructuredConfig(stage="structured", intermediate_size=64, round_to=16), imp)
    want, losses = greedy_layers(widths_only, windows(), 1, progress=False)
    report = prune(model, c, imp, cut, progress=False)
    assert cut.layers == want == report["kept_layers"] and report["depth_ranking"] == "loss"
    assert report["depth_losses"] == [round(x, 4) for x in losses]


def test_params_budget_is_met_by_one_common_factor():
    model = tiny("qwen2")
    before = non_embedding_params(sizes_of(model), qkv_bias=True)
    axes = ["mlp", "hidden", "depth"]
    report = prune(model, cfg(params=0.6, round_to=16, axes=axes), measure(model, windows(), progress=False))
    assert report["non_embedding_params_after"] <= 0.6 * before
    assert report["non_embedding_fraction"] > 0.3  # the largest factor that fits, not any
    a = report["after"]
    assert a["intermediate"] < 128 and a["hidden"] < 64 and a["heads"] == 4


def test_params_budget_by_default_keeps_the_hidden_width():
    model = tiny("qwen2")
    before = sizes_of(model)
    report = prune(model, cfg(params=0.6, round_to=16), measure(model, windows(), progress=False))
    a = report["after"]
    assert a["hidden"] == before.hidden and a["heads"] == before.heads  # default axes: mlp, depth
    assert a["intermediate"] < before.intermediate and a["layers"] < before.layers
    assert report["non_embedding_fraction"] <= 0.6


def test_saved_folder_reloads_with_the_same_logits(tmp_path, tiny_text_file, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from llmopt.compression import compress

    out = tmp_path / "cut"
    recipe = {
        "calibration": {"data": f"text:{tiny_text_file}", "samples": 8, "seq_len": 32},
        "stages": [{"stage": "structured", **ALL_AXES, "num_attention_heads": 2, "refine_epochs": 2}],
    }
    res = compress(str(tiny_model_dir), recipe, out)
    rep = res.report["model_stages"]["0:structured"]
    assert rep["after"]["hidden"] == 48 and rep["non_embedding_fraction"] < 0.6
    refine = rep["reconstruction"]["refine"]  # the stage passes its refinement settings through
    assert refine["epochs"] == 2 and len(refine["layer_error_before_after"]) == 2
    cfgj = json.loads((out / "config.json").read_text())
    assert (cfgj["hidden_size"], cfgj["intermediate_size"], cfgj["num_hidden_layers"]) == (48, 64, 2)
    eps0 = json.loads((tiny_model_dir / "config.json").read_text())["rms_norm_eps"]
    assert cfgj["rms_norm_eps"] == pytest.approx(eps0 * 64 / 48, rel=1e-12)  # RMSNorm over 48 of 64 channels
    m = AutoModelForCausalLM.from_pretrained(out).eval()
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    tok = make_tiny_tokenizer(tiny_text_file.read_text())
    ids = torch.tensor([tok(tiny_text_file.read_text()[:400])["input_ids"][:48]])
    # generation with the KV cache runs on the renumbered layers and equals the cache-free logits
    with torch.no_grad():
        full = m(ids).logits
        half = m(ids[:, :24], use_cache=True)
        step = m(ids[:, 24:], past_key_values=half.past_key_values, use_cache=True).logits
    assert torch.allclose(step, full[:, 24:], atol=1e-4)


# ---- recipes, exports, errors --------------------------------------------------------------------------


def test_cli_compress_with_a_structured_recipe_prints_its_summary(tmp_path, tiny_text_file, tiny_model_dir, capsys):
    """The CLI's summary line reads each whole-model stage's own report (it once assumed every one was a distill)."""
    import yaml

    from llmopt.cli import main

    recipe = tmp_path / "cut.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [{"stage": "structured", "intermediate_size": 64, "num_layers": 1}]}))
    out = tmp_path / "cut"
    argv = ["compress", str(tiny_model_dir), "--recipe", str(recipe), "--output", str(out)]
    rc = main([*argv, "--calib", f"text:{tiny_text_file}", "--calib-samples", "4", "--calib-seq-len", "32"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    line = next(x for x in printed.splitlines() if "stage 0:structured" in x)
    assert "layers 2 -> 1" in line and "intermediate" in line and "non-embedding ones kept" in line
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1


def _cut(tmp_path, text_file, model_dir, stages: list[dict]):
    """compress the tiny Llama with ``stages``; returns the folder and 32 evaluation token ids."""
    from llmopt.compression import compress

    out = tmp_path / "cut"
    recipe = {"calibration": {"data": f"text:{text_file}", "samples": 8, "seq_len": 32}, "stages": stages}
    compress(str(model_dir), recipe, out)
    tok = make_tiny_tokenizer(text_file.read_text())
    ids = torch.tensor(tok(text_file.read_text()[2000:3000], add_special_tokens=False)["input_ids"][:32])
    return out, ids


def _backend_logits(backend, ids) -> torch.Tensor:
    try:
        return backend.logits(ids)
    finally:
        backend.close()


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got - ref).abs().max().item() / ref.abs().max().item()


@pytest.mark.llamacpp
def test_structured_gptq_q4_0_distill_exports_gguf_matching_torch(tmp_path, tiny_text_file, tiny_model_dir):
    pytest.importorskip("llama_cpp")
    from llmopt.backends.llamacpp_backend import LlamaCppBackend
    from llmopt.exporters import export_gguf
    from tests.test_export_archs import torch_logits

    stages = [
        {"stage": "structured", "intermediate_size": 64, "hidden_size": 32, "num_layers": 1},
        {"stage": "gptq", "format": "q4_0"},
        {"stage": "distill", "max_tokens": 256, "seq_len": 32, "top_k": 8, "heldout_windows": 1},
    ]
    out, ids = _cut(tmp_path, tiny_text_file, tiny_model_dir, stages)
    index = json.loads((out / "quantization.json").read_text())
    assert index and all(v["format"] == "q4_0" for v in index.values())
    gg = tmp_path / "cut.gguf"
    rep = export_gguf(str(out), str(gg), type="auto")
    assert rep["tensor_types"]["Q4_0"] == len(index)
    got = _backend_logits(LlamaCppBackend(str(gg), threads=2), ids)
    assert _rel(got, torch_logits(out, ids)) < 0.06  # llama.cpp's q4_0 matmuls quantize activations to q8_0


@pytest.mark.llamacpp
def test_f32_gguf_of_a_cut_model_matches_torch(tmp_path, tiny_text_file, tiny_model_dir):
    pytest.importorskip("llama_cpp")
    from llmopt.backends.llamacpp_backend import LlamaCppBackend
    from llmopt.exporters import export_gguf
    from tests.test_export_archs import torch_logits

    stages = [{"stage": "structured", "num_attention_heads": 2, "hidden_size": 48, "round_to": 16}]
    out, ids = _cut(tmp_path, tiny_text_file, tiny_model_dir, stages)
    gg = tmp_path / "cut.gguf"
    export_gguf(str(out), str(gg), type="f32")  # head_dim 16 with 2 heads on a 48-wide residual stream
    got = _backend_logits(LlamaCppBackend(str(gg), threads=2), ids)
    assert _rel(got, torch_logits(out, ids)) < 3e-3


def test_onnx_export_of_a_cut_model_matches_torch(tmp_path, tiny_text_file, tiny_model_dir):
    pytest.importorskip("onnxruntime")
    from llmopt.backends.onnx_backend import OnnxBackend
    from llmopt.exporters import export_onnx
    from tests.test_export_archs import torch_logits

    stages = [{"stage": "structured", "intermediate_size": 64, "num_layers": 1, "round_to": 16}]
    out, ids = _cut(tmp_path, tiny_text_file, tiny_model_dir, stages)
    onnx_dir = tmp_path / "onnx"
    export_onnx(str(out), str(onnx_dir))
    got = _backend_logits(OnnxBackend.from_spec(str(onnx_dir)), ids)
    assert _rel(got, torch_logits(out, ids)) < 1e-3


@pytest.mark.parametrize(
    "stages,needle",
    [
        ([{"stage": "rtn", "format": "q4_0"}, {"stage": "structured", "num_layers": 1}], "must come before"),
        ([{"stage": "structured", "num_attention_heads": 3}], "multiple of the 2 query heads"),
        ([{"stage": "structured", "hidden_size": 640}], "larger than the model's 64"),
        ([{"stage": "structured", "num_layers": 5}], "more than the model's 2"),
    ],
)
def test_bad_structured_recipes_fail_in_one_line(stages, needle, tmp_path, tiny_text_file, tiny_model_dir):
    from llmopt.compression import compress

    recipe = {"calibration": {"data": f"text:{tiny_text_file}", "samples": 4, "seq_len": 32}, "stages": stages}
    with pytest.raises(LLMOptError, match=needle) as e:
        compress(str(tiny_model_dir), recipe, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "entry,needle",
    [
        ({"params": 0.5, "num_layers": 2}, "either params or explicit sizes"),
        ({}, "give params"),
        ({"intermediate_size": 0}, "must be >= 1"),
        ({"hidden_size": 1.5}, "fraction kept must be in"),
        ({"num_layer": 2}, "valid keys"),
    ],
)
def test_structured_config_errors(entry, needle):
    from llmopt.recipe import parse_recipe

    with pytest.raises(LLMOptError, match=needle):
        parse_recipe({"stages": [{"stage": "structured", **entry}]})


def test_other_architectures_are_refused_before_any_work(tmp_path, tiny_text_file):
    from llmopt.compression import compress
    from tests.tiny_archs import save_tiny_model

    tok = make_tiny_tokenizer(tiny_text_file.read_text())
    folder = tmp_path / "gpt2"
    save_tiny_model("gpt2", folder, tok)
    recipe = {
        "calibration": {"data": f"text:{tiny_text_file}", "samples": 4, "seq_len": 32},
        "stages": [{"stage": "structured", "num_layers": 1}],
    }
    with pytest.raises(LLMOptError, match="supports llama, mistral, qwen2, qwen3"):
        compress(str(folder), recipe, tmp_path / "out")


def test_rms_norm_rescale_is_exact_math():
    # x/sqrt(a*m + eps) == a^-1/2 * x/sqrt(m + eps/a), the identity prune_hidden relies on
    a, m, eps = 48 / 64, 0.37, 1e-6
    assert 1 / math.sqrt(a * m + eps) == pytest.approx(a**-0.5 / math.sqrt(m + eps / a), rel=1e-14)


def test_qwen3_hidden_cut_is_exact_with_a_large_eps(tmp_path):
    """Qwen3's per-head q/k RMSNorms normalise over head_dim, which a hidden cut keeps, but read the one
    config ε the residual norms need rescaled: the cut must leave their output unchanged (a large ε makes a
    changed ε visible), also after a save and reload (every norm built from the saved config)."""
    from transformers import AutoModelForCausalLM

    model = tiny("qwen3")
    model.config.rms_norm_eps = 0.05
    for m in model.modules():
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 0.05
    ids = windows(2, 40, seed=4)
    imp = measure(model, windows(), progress=False)
    c = cfg(hidden_size=32)
    ref, _ = zeroed_reference(model, imp, c)
    prune(model, c, imp)
    want = logits(ref, ids)
    got = logits(model, ids)
    assert (got - want).abs().max().item() < TOL * want.abs().max().item(), (got - want).abs().max()
    model.save_pretrained(tmp_path / "cut")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "cut", torch_dtype=torch.float32)
    again = logits(reloaded, ids)  # summation order may differ (attention implementation), ε may not
    assert (again - got).abs().max().item() < TOL * want.abs().max().item()
