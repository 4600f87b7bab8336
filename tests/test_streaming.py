"""``--low-memory``: the model streamed one decoder layer at a time from its safetensors shards gives the very
same output folder as the in-memory run (weights, codes, scales, masks, configs: bit for bit), holds one
decoder layer's parameters at a time, and refuses what it cannot stream in one line."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llmopt.compression import compress
from llmopt.errors import LLMOptError
from tests.conftest import make_tiny_tokenizer
from tests.tiny_archs import save_tiny_model


@pytest.fixture(scope="module")
def tokenizer(tiny_text_file):
    return make_tiny_tokenizer(tiny_text_file.read_text())


def random_llama(folder: Path, tokenizer, *, hidden=64, layers=3, kv=2, tied=True, inter=None, seed=0) -> Path:
    """A Llama of transformers' own random init (std 0.02) saved as safetensors with the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=inter or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv,
        tie_word_embeddings=tied,
        initializer_range=0.02,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        if p.name != "quantization.safetensors":
            with safe_open(str(p), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def codes(folder: Path) -> dict[str, torch.Tensor]:
    p = folder / "quantization.safetensors"
    if not p.exists():
        return {}
    with safe_open(str(p), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_folder(a: Path, b: Path) -> None:
    """Every tensor (weights, codes, scales) bit for bit equal, same dtypes; same config and quantization index."""
    for load in (weights, codes):
        ta, tb = load(a), load(b)
        assert sorted(ta) == sorted(tb)
        for k in ta:
            assert ta[k].dtype == tb[k].dtype, k
            assert torch.equal(ta[k], tb[k]), k
    for f in ("config.json", "generation_config.json", "quantization.json"):
        assert (a / f).exists() == (b / f).exists(), f
        if (a / f).exists():
            assert json.loads((a / f).read_text()) == json.loads((b / f).read_text()), f
    assert not (b / ".llmopt-codes").exists()  # the offloaded codes went once written
    index = json.loads((b / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights(b))  # the index names every tensor, each in its shard
    for name, shard in index["weight_map"].items():
        with safe_open(str(b / shard), framework="pt") as f:
            assert name in f.keys()
    sizes = sum(t.numel() * t.element_size() for t in weights(b).values())
    assert index["metadata"]["total_size"] == sizes


def both(model: Path, recipe, tmp_path: Path, **kw) -> tuple[Path, Path, dict]:
    """The in-memory and the streamed output of one compression; the streamed run's report."""
    a, b = tmp_path / "in-memory", tmp_path / "streamed"
    compress(str(model), recipe, a, low_memory=False, **kw)
    rb = compress(str(model), recipe, b, low_memory=True, **kw)
    return a, b, rb.report


GPTQ_HEAD = {"stages": [{"stage": "gptq", "format": "q4_0", "act_order": True, "head": "q8_0"}]}


@pytest.mark.parametrize(
    "shape",
    [
        dict(hidden=64, layers=3, kv=2, tied=True),
        dict(hidden=128, layers=2, kv=4, tied=False, inter=256),
    ],
    ids=["tied", "untied"],
)
@pytest.mark.parametrize("recipe", ["gptq-q4_0", "sparsegpt-50", "gptq-head"])
def test_streamed_equals_in_memory(tokenizer, tiny_text_file, tmp_path, shape, recipe):
    """gptq-q4_0 (llama.cpp's mix: q4_1 ffn_down in the first layers), sparsegpt-50 and GPTQ with the output
    head quantized (tied: the token embedding itself) give identical folders streamed or not."""
    model = random_llama(tmp_path / "model", tokenizer, **shape)
    rec = GPTQ_HEAD if recipe == "gptq-head" else recipe
    a, b, report = both(model, rec, tmp_path, calib=f"text:{tiny_text_file}", calib_samples=4, calib_seq_len=64)
    assert_same_folder(a, b)
    assert report["low_memory"] is True
    if recipe == "sparsegpt-50":  # the masks: every zero in the same place, half of each Linear
        wb = weights(b)
        q = wb["model.layers.0.self_attn.q_proj.weight"]
        assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_streamed_bfloat16_and_gptaq(tokenizer, tiny_text_file, tmp_path):
    """A bfloat16 run (quantized Linears saved in exact float32, the rest in bfloat16) with GPTAQ's second
    activation stream (a copy of each layer before compression) is identical streamed."""
    model = random_llama(tmp_path / "model", tokenizer, layers=2)
    rec = {"stages": [{"stage": "gptq", "format": "q4_0", "asymmetric": True, "head": "q8_0"}]}
    calib = dict(calib=f"text:{tiny_text_file}", calib_samples=4, calib_seq_len=64)
    a, b, report = both(model, rec, tmp_path, dtype="bfloat16", **calib)
    assert_same_folder(a, b)
    w = weights(b)
    assert w["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    assert w["model.norm.weight"].dtype == torch.bfloat16 and report["dtype"] == "bfloat16"


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gemma2"])
def test_streamed_other_architectures(arch, tokenizer, tiny_text_file, tmp_path):
    """Transposed Conv1D weights and learned positions (gpt2), a decoder under model.decoder with biases (opt),
    per-layer sliding-window masks (gemma2): streamed as in memory."""
    model = tmp_path / "model"
    save_tiny_model(arch, model, tokenizer)
    rec = {"stages": [{"stage": "gptq", "bits": 4, "group_size": 32}]}
    a, b, _ = both(model, rec, tmp_path, calib=f"text:{tiny_text_file}", calib_samples=4, calib_seq_len=32)
    assert_same_folder(a, b)


def test_one_layer_in_memory_at_a_time(tokenizer, tiny_text_file, tmp_path):
    """Whenever a decoder layer runs, at most one decoder layer's parameters are materialised and nothing
    outside the layers (embeddings, head) is; the embedding is read only to capture the first layer's inputs
    and for the head; afterwards nothing is held."""
    from llmopt.calibration.streaming import StreamingLayerSource
    from llmopt.compression import compress_model
    from llmopt.core.state import CompressionState
    from llmopt.data import calibration_windows
    from llmopt.models.lazy import LazyModel
    from llmopt.recipe import parse_recipe
    from llmopt.safetensors_io import ShardWriter

    folder = random_llama(tmp_path / "model", tokenizer, hidden=128, layers=6, tied=False)
    lazy = LazyModel(folder)
    model = lazy.model
    layers = model.model.layers
    one_layer = sum(p.numel() for p in layers[0].parameters())
    embed, head = model.model.embed_tokens, model.lm_head
    seen = {"layer_runs": 0, "embed_runs": 0, "head_runs": 0}

    def on_layer(module, args):
        held = sum(p.numel() for p in layers.parameters() if not p.is_meta)
        assert held <= one_layer
        if not any(p.is_meta for p in module.parameters()):  # a real forward of this layer
            seen["layer_runs"] += 1
            assert embed.weight.is_meta and head.weight.is_meta and model.model.norm.weight.is_meta

    def on_outside(key):
        def fn(module, args):
            seen[key] += 1
            assert sum(p.numel() for p in layers.parameters() if not p.is_meta) == 0

        return fn

    for layer in layers:
        layer.register_forward_pre_hook(on_layer)
    embed.register_forward_pre_hook(on_outside("embed_runs"))
    head.register_forward_pre_hook(on_outside("head_runs"))
    rec = parse_recipe({"stages": [{"stage": "gptq", "format": "q4_0", "head": "q8_0"}]})
    windows = calibration_windows(f"text:{tiny_text_file}", tokenizer, 4, 64)
    out = tmp_path / "out"
    out.mkdir()
    state = CompressionState()
    source = StreamingLayerSource(lazy, ShardWriter(out, StreamingLayerSource.shards(lazy)), state)
    compress_model(model, rec, windows, context=None, state=state, source=source)
    source.finish()
    assert source.max_layer_params == one_layer
    assert seen["layer_runs"] >= 6 * 2  # statistics and outputs of each layer
    assert seen["embed_runs"] > 0 and seen["head_runs"] > 0
    assert lazy.materialized() == 0
    assert len(list(out.glob("model-*.safetensors"))) == 7


def embedded_model(folder: Path, layers: int) -> Path:
    """The embedded SmolLM2-135M's first ``layers`` decoder layers with its real embedding, norm and tokenizer
    (from its converted safetensors folder): a real checkpoint small enough for a test."""
    import shutil

    from safetensors.torch import save_file

    from llmopt.models import resolve_local_folder

    src = Path(resolve_local_folder("bundled:smollm2"))
    folder.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "llmopt_gguf.json"):
            shutil.copy(f, folder / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (folder / "config.json").write_text(json.dumps(cfg))
    keep = {}
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers:
                keep[k] = f.get_tensor(k)
    save_file(keep, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_embedded_model_streamed_equals_in_memory(tiny_text_file, tmp_path):
    """The embedded SmolLM2-135M cut to its first decoder layer, the shipped gptq-q4_0 (act order, static
    groups, the scale search, llama.cpp's mix) on 4 windows of 128 tokens: codes, scales and saved weights
    identical streamed or in memory."""
    model = embedded_model(tmp_path / "smollm2-1", layers=1)
    t0 = time.perf_counter()
    calib = dict(calib=f"text:{tiny_text_file}", calib_samples=4, calib_seq_len=128)
    a, b, _ = both(model, "gptq-q4_0", tmp_path, **calib)
    print(f"\nembedded (1 layer) gptq-q4_0 in memory + streamed: {time.perf_counter() - t0:.1f} s")
    assert_same_folder(a, b)


@pytest.mark.parametrize(
    "recipe, calib, match",
    [
        ("rtn-q4_0", None, r"stage 1 \(rtn\) is data-free"),
        ("sparsegpt-50-owl", None, r"OWL"),
        ("structured-mlp25", None, r"stage 1 \(structured\) works on the whole model"),
        ("sparsegpt-50", "self:4", r"self:N"),
    ],
)
def test_refused_when_forced(tiny_model_dir, tmp_path, recipe, calib, match):
    with pytest.raises(LLMOptError, match=match):
        compress(str(tiny_model_dir), recipe, tmp_path / "o", calib=calib, low_memory=True)
    assert not (tmp_path / "o").exists()


def test_gguf_not_converted_is_one_line(tmp_path):
    from llmopt.models import streamable_folder

    with pytest.raises(LLMOptError, match="GGUF file not converted yet: convert it once") as e:
        streamable_folder("bundled:smollm2", cache_dir=str(tmp_path))
    assert "\n" not in str(e.value)


def test_chosen_automatically_when_memory_is_short(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch, caplog):
    from llmopt import memory

    monkeypatch.setattr(memory, "available_mib", lambda: 0.1)  # the tiny model's float32 size is ~0.3 MiB
    caplog.set_level(logging.INFO, logger="llmopt.calibration.streaming")
    r = compress(str(tiny_model_dir), "gptq-q4_0", tmp_path / "o", calib=f"text:{tiny_text_file}", calib_samples=2)
    assert r.report["low_memory"] is True
    assert "exceeds 50% of the available memory" in caplog.text
    caplog.clear()
    r = compress(str(tiny_model_dir), "rtn-q4_0", tmp_path / "q")  # data-free: loaded whole, with a warning
    assert "low_memory" not in r.report
    assert "cannot be streamed, so it is loaded whole" in caplog.text and "rtn" in caplog.text
    monkeypatch.setattr(memory, "available_mib", lambda: 1e6)
    r = compress(str(tiny_model_dir), "gptq-q4_0", tmp_path / "p", calib=f"text:{tiny_text_file}", calib_samples=2)
    assert "low_memory" not in r.report


def test_cli_flag_and_one_line_refusal(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    from llmopt.cli import main

    calib = ["--calib", f"text:{tiny_text_file}", "--calib-samples", "2", "--calib-seq-len", "32"]
    out = tmp_path / "o"
    args = ["compress", str(tiny_model_dir), "--recipe", "sparsegpt-50", "--output", str(out), *calib]
    assert main([*args, "--low-memory"]) == 0
    assert json.loads((out / "llmopt_report.json").read_text())["low_memory"] is True
    capsys.readouterr()
    args = ["compress", str(tiny_model_dir), "--recipe", "rtn-q4_0", "--output", str(tmp_path / "p")]
    rc = main([*args, "--low-memory"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.startswith("error: --low-memory streams the model") and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_linears_parked_during_later_kernels(tokenizer, tiny_text_file, tmp_path, monkeypatch, dtype):
    """While a layer's later kernels run, the Linears GPTQ already quantized hold no weight (meta) and the
    statistics of the Linears done are gone; rebuilt from the codes afterwards, the output is bit for bit that
    of a run that keeps every weight (in memory and streamed)."""
    from llmopt.calibration import engine
    from llmopt.stages.quantization import GPTQStage

    model = random_llama(tmp_path / "model", tokenizer, layers=2)
    calib = dict(calib=f"text:{tiny_text_file}", calib_samples=4, calib_seq_len=64, dtype=dtype)
    seen: dict[str, list[bool]] = {}
    group: dict = {}
    kernel, apply = GPTQStage.compress_linear, engine.apply_linears

    def remember(stage, linears, *a, **k):
        group.clear()
        group.update(linears)
        return apply(stage, linears, *a, **k)

    def spy(self, name, W, stats, state, layer_index):
        if name.endswith("mlp.down_proj"):
            seen[name] = [lin.weight.is_meta for lin in group.values()]
        return kernel(self, name, W, stats, state, layer_index)

    monkeypatch.setattr(engine, "apply_linears", remember)
    monkeypatch.setattr(GPTQStage, "compress_linear", spy)
    compress(str(model), "gptq-q4_0", tmp_path / "parked", low_memory=False, **calib)
    assert len(seen) == 2 and all(v == [True] * 6 + [False] for v in seen.values()), seen
    compress(str(model), "gptq-q4_0", tmp_path / "streamed", low_memory=True, **calib)
    monkeypatch.setattr(engine, "_park", lambda lin, q: False)
    compress(str(model), "gptq-q4_0", tmp_path / "kept", low_memory=False, **calib)
    for load in (weights, codes):
        kept, parked = load(tmp_path / "kept"), load(tmp_path / "parked")
        assert sorted(kept) == sorted(parked) and all(torch.equal(kept[k], parked[k]) for k in kept)
    assert_same_folder(tmp_path / "kept", tmp_path / "streamed")


def test_group_statistics_forgotten_after_their_last_kernel():
    """A group's statistics are closed when a kernel asks and dropped once no later Linear shares them."""
    from llmopt.calibration.stats import StatsAccumulator

    lins = {n: torch.nn.Linear(8, 8) for n in ("q", "k", "o")}
    acc = StatsAccumulator(lins, "hessian")
    x = torch.randn(2, 5, 8)
    acc.new_forward()
    for n in ("q", "k"):
        lins[n](x)  # the same tensor: k shares q's accumulation
    acc.new_forward()
    lins["o"](torch.randn(2, 5, 8))
    h = acc.get("q").hessian
    assert h.shape == (8, 8) and torch.equal(h, h.T)
    acc.forget("q", keep_for=["k", "o"])
    assert acc.get("k").hessian is h  # still held: k shares it
    acc.forget("k", keep_for=["o"])
    assert not acc.has("q") and not acc.has("k") and acc.has("o")


def test_streamed_run_returns_large_blocks(tokenizer, tiny_text_file, tmp_path, monkeypatch):
    """The streamed path (and only it) fixes glibc's mmap threshold, so freed blocks of 4 MiB or more leave."""
    from llmopt import compression, memory

    calls = []
    monkeypatch.setattr(compression, "return_large_blocks", lambda: calls.append(1) or True)
    model = random_llama(tmp_path / "model", tokenizer, layers=1)
    calib = dict(calib=f"text:{tiny_text_file}", calib_samples=2, calib_seq_len=32)
    compress(str(model), "gptq-q4_0", tmp_path / "a", low_memory=False, **calib)
    assert calls == []
    compress(str(model), "gptq-q4_0", tmp_path / "b", low_memory=True, **calib)
    assert calls == [1]
    assert memory.LOW_MEMORY_MMAP_THRESHOLD == 4 << 20
