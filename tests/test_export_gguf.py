"""GGUF export and the llama.cpp (``gguf``) backend.

Exactness properties: an F32 export gives llama.cpp the logits torch computes and the token ids the HF
tokenizer gives; an ``auto`` export of an llmopt folder holds the stored codes bit for bit (dequantized by
gguf-py they equal the folder's fake-quant weights); llama.cpp's imatrix quantization lowers the
imatrix-weighted error of every Linear. Bad inputs give one-line errors and leave no file.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from llmopt.errors import LLMOptError
from llmopt.exporters import export_gguf
from llmopt.exporters.gguf import compute_imatrix, permute_qk, unpermute_qk

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.llamacpp

LINES = [
    "the city of the river was first in 1990 , and 17 ( 3.5 ) @-@ song",
    "  leading spaces,\ttabs and\n\nnew lines   trailing  ",
    "émoji 🚀 ünïcode 我想 нещо 'll 've 's",
    "album season 2004 = = war = =",
]


def _torch_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids.view(1, -1)).logits[0].float()


def _backend(path):
    from llmopt.backends.llamacpp_backend import LlamaCppBackend

    return LlamaCppBackend(path, threads=2)


@pytest.fixture(scope="module")
def tiny_f32(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    report = export_gguf(str(tiny_model_dir), str(out), type="f32")
    assert report["tensor_types"] == {"F32": 2 + 2 * 9}  # embd + output_norm + 9 per layer (tied: no output)
    assert report["pre_tokenizer"] == "gpt-2"
    return out


def test_permute_qk_pairs_the_two_halves_of_each_head():
    rows = np.arange(16)  # 2 heads x head_dim 8: HF halves (0..3 | 4..7) → llama.cpp pairs (0,4), (1,5), ...
    p = permute_qk(rows, 2)
    assert p[:8].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert p[8:].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]
    x = np.random.default_rng(0).standard_normal((24, 5))
    assert np.array_equal(unpermute_qk(permute_qk(x, 3), 3), x)


def test_f32_export_matches_torch_logits_and_tokens(tiny_model_dir, tiny_f32):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    be = _backend(tiny_f32)
    try:
        for line in LINES:
            ours = be.llm.tokenize(line.encode(), add_bos=False, special=False)
            assert ours == tok(line, add_special_tokens=False)["input_ids"], line
        ids = torch.tensor(tok(" ".join(LINES * 4), add_special_tokens=False)["input_ids"][:160])
        ref = _torch_logits(tiny_model_dir, ids)
        got = be.logits(ids)
    finally:
        be.close()
    assert got.shape == ref.shape and got.dtype == torch.float32
    # llama.cpp keeps its KV cache in F16: ~0.02 here, logits have std ~8 (3e-5 with an F32 cache)
    diff = (got - ref).abs().max().item()
    assert diff < 0.01 * ref.std().item(), diff
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_exported_gguf_is_an_eval_spec(tiny_model_dir, tiny_f32, tiny_text_file):
    from transformers import AutoTokenizer

    from llmopt.backends import make_backend
    from llmopt.backends.llamacpp_backend import LlamaCppBackend
    from llmopt.evaluation import evaluate
    from llmopt.models import load_tokenizer

    text = tiny_text_file.read_text()[:3000] + "".join(LINES)
    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    from_gguf = load_tokenizer(str(tiny_f32))  # built from the GGUF metadata, no weights touched
    assert from_gguf(text, add_special_tokens=False)["input_ids"] == hf(text, add_special_tokens=False)["input_ids"]

    data = f"text:{tiny_text_file}"
    a = evaluate(str(tiny_model_dir), data=data, seq_len=128, max_windows=2, progress=False)
    b = evaluate(str(tiny_f32), data=data, seq_len=128, max_windows=2, progress=False)
    assert (a.backend, b.backend) == ("torch", "gguf")
    assert b.perplexity == pytest.approx(a.perplexity, rel=1e-3)

    be = make_backend("auto", str(tiny_f32), threads=2)
    try:
        assert isinstance(be, LlamaCppBackend) and be.vocab_size == len(hf)
        s = be.time_generation(torch.arange(40) % be.vocab_size, 8)
        assert s.prefill_tok_s > 0 and s.decode_tok_s > 0 and (s.prompt_tokens, s.new_tokens) == (40, 8)
        be.threads = 1
        assert be.threads == 1 and be.time_generation(torch.arange(4), 2).threads == 1
        long = be.logits(torch.arange(700) % be.vocab_size)  # longer than the first context: rebuilt
        assert long.shape == (700, be.vocab_size)
    finally:
        be.close()


RECIPES = {
    "rtn-q4_0": {"stages": [{"stage": "rtn", "format": "q4_0"}]},
    "rtn-q8_0": {"stages": [{"stage": "rtn", "format": "q8_0"}]},
    "gptq-q4_0": {"stages": [{"stage": "gptq", "format": "q4_0"}]},
    "gptq-q5_1": {"stages": [{"stage": "gptq", "format": "q5_1"}]},
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_auto_export_writes_stored_codes_bit_for_bit(name, tiny_model_dir, tiny_text_file, tmp_path):
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    from llmopt.compression import compress
    from llmopt.formats import make_format

    recipe = dict(RECIPES[name])
    if name.startswith("gptq"):
        recipe["calibration"] = {"data": f"text:{tiny_text_file}", "samples": 4, "seq_len": 64}
    folder = tmp_path / name
    compress(str(tiny_model_dir), recipe, folder)
    out = tmp_path / f"{name}.gguf"
    report = export_gguf(str(folder), str(out), type="auto", embedding_type="f32")
    fmt = make_format(name.split("-")[1])
    assert report["tensor_types"] == {"F32": 6, fmt.gguf_type.name: 14}
    assert report["linear_bits_per_weight"] == pytest.approx(fmt.bits_per_weight())

    cfg = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    stored = load_file(str(folder / "quantization.safetensors"))
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    index = json.loads((folder / "quantization.json").read_text())
    assert len(index) == 14
    for linear in index:
        t = tensors[tmap.get_name(linear + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type == fmt.gguf_type
        raw = np.asarray(t.data)
        heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}.get(linear[-6:])
        if heads:
            raw = unpermute_qk(raw, heads)
        W = dequantize(raw, t.tensor_type)
        ref = weights[linear + ".weight"].numpy()
        assert W.dtype == np.float32 and np.array_equal(W.view(np.uint32), ref.view(np.uint32)), linear
        codes, _ = fmt.from_gguf_blocks(raw)
        assert torch.equal(codes, stored[linear + ".codes"]), linear
    assert torch.equal(
        torch.from_numpy(np.array(tensors["token_embd.weight"].data)), weights["model.embed_tokens.weight"]
    )

    # llama.cpp runs it; its q4_0 / q8_0 matmuls quantize activations to q8_0, so logits differ a little
    ids = torch.arange(96) * 7 % cfg["vocab_size"]
    be = _backend(out)
    try:
        got = be.logits(ids)
    finally:
        be.close()
    ref = _torch_logits(folder, ids)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_llama_cpp_quantizer_with_imatrix(tiny_model_dir, tiny_text_file, tiny_f32, tmp_path):
    """imatrix (mean x² per input column) passed through llama_model_quantize_params.imatrix: llama.cpp's
    q4_0 then minimises Σ imatrix_j (w_j − ŵ_j)², lower than the plain q4_0 for every Linear."""
    from gguf.quants import dequantize

    from llmopt.models import load_model

    data = f"text:{tiny_text_file}"
    plain, weighted, from_file = tmp_path / "q4.gguf", tmp_path / "q4-im.gguf", tmp_path / "q4-file.gguf"
    r = export_gguf(str(tiny_model_dir), str(plain), type="q4_0")
    assert r["tensor_types"]["Q4_0"] == 14 and r["linear_bits_per_weight"] == 4.5
    r = export_gguf(
        str(tiny_model_dir), str(weighted), type="q4_0", imatrix=data, imatrix_samples=4, imatrix_seq_len=64
    )
    assert r["imatrix_entries"] == 14

    loaded = load_model(str(tiny_model_dir))
    imatrix = compute_imatrix(loaded.model, loaded.tokenizer, data, samples=4, seq_len=64)
    ref = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tiny_f32).tensors}
    a = {t.name: t for t in gguf.GGUFReader(plain).tensors}
    b = {t.name: t for t in gguf.GGUFReader(weighted).tensors}
    for name, imp in imatrix.items():
        err_plain = ((dequantize(a[name].data, a[name].tensor_type) - ref[name]) ** 2 * imp).sum()
        err_imatrix = ((dequantize(b[name].data, b[name].tensor_type) - ref[name]) ** 2 * imp).sum()
        assert err_imatrix < err_plain, name

    # the same matrix as a llama.cpp GGUF imatrix file (in_sum2 / counts) gives the same bytes
    path = tmp_path / "imatrix.gguf"
    w = gguf.GGUFWriter(path, "imatrix")
    for name, imp in imatrix.items():
        w.add_tensor(f"{name}.in_sum2", (imp * 256).astype(np.float32))
        w.add_tensor(f"{name}.counts", np.array([256.0], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    export_gguf(str(tiny_model_dir), str(from_file), type="q4_0", imatrix=str(path))
    c = {t.name: t for t in gguf.GGUFReader(from_file).tensors}
    for name in imatrix:
        assert np.array_equal(np.asarray(b[name].data), np.asarray(c[name].data)), name


def test_gptq_q4_0_has_llama_cpps_tensor_types_and_file_size(tiny_text_file, tmp_path):
    """GPTQ q4_0 (mixture llama.cpp, the default) writes the first n_layer/8 ffn_down Linears as q4_1, as
    llama.cpp's Q4_0 with an importance matrix does: the same type for every tensor, the same tensor bytes.
    `mixture: none`, RTN (data-free, as llama.cpp without an imatrix) and a pruned model keep every Linear in
    q4_0."""
    from llmopt.compression import compress
    from tests.conftest import make_tiny_llama, make_tiny_tokenizer

    d = tmp_path / "tiny16"
    tok = make_tiny_tokenizer(tiny_text_file.read_text())
    make_tiny_llama(len(tok), layers=16, hidden=32).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    data = f"text:{tiny_text_file}"
    ref = tmp_path / "llama-q4_0-imatrix.gguf"
    export_gguf(str(d), str(ref), type="q4_0", imatrix=data, imatrix_samples=4, imatrix_seq_len=64)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(ref).tensors}

    def tensor_bytes(path):
        return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)

    assert {n for n, t in types.items() if t == "Q4_1"} == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}

    calib = {"data": data, "samples": 4, "seq_len": 64}
    sparse = {"stage": "sparsegpt", "sparsity": 0.5}  # pruned Linears keep q4_0, whose grid has an exact 0
    cases = [([{"stage": "gptq"}], False), ([{"stage": "gptq", "mixture": "none"}], True),
             ([{"stage": "rtn"}], True), ([sparse, {"stage": "gptq"}], True)]  # fmt: skip
    for i, (stages, uniform) in enumerate(cases):
        stages[-1]["format"] = "q4_0"
        folder, out = tmp_path / f"case{i}", tmp_path / f"case{i}.gguf"
        compress(str(d), {"calibration": calib, "stages": stages}, folder)
        index = json.loads((folder / "quantization.json").read_text())
        guarded = {n for n, e in index.items() if e["format"] == "q4_1"}
        assert guarded == (set() if uniform else {f"model.layers.{j}.mlp.down_proj" for j in (0, 1)})
        export_gguf(str(folder), str(out), type="auto")  # the tied embedding in llama.cpp's Q8_0 too
        got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
        if uniform:
            assert set(got.values()) == {"F32", "Q4_0", "Q8_0"}
        else:
            assert got == types  # same types, shapes: the same tensor bytes (metadata differs a little)
            assert tensor_bytes(out) == tensor_bytes(ref)


def test_sink_weight_applies_to_value_projections_only():
    from llmopt.recipe import parse_recipe
    from llmopt.stages import build_stages

    stage = build_stages(parse_recipe({"stages": [{"stage": "gptq", "format": "q4_0"}]}))[0]
    assert stage.first_token_weight("model.layers.7.self_attn.v_proj") == 1.0
    for other in ("model.layers.7.self_attn.k_proj", "model.layers.7.self_attn.o_proj", "transformer.h.1.attn.c_attn"):
        assert stage.first_token_weight(other) == 0.0, other


def test_qwen2_export_matches_torch(tiny_model_dir, tmp_path):
    """Qwen2: NEOX rotary (no Q/K permutation) and q/k/v biases."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(0, 1.0 if "embed" in n else 0.15 if p.dim() == 2 else 0.1)
            if "norm" in n:
                p.add_(1.0)
    folder = tmp_path / "qwen2"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "qwen2.gguf"
    report = export_gguf(str(folder), str(out), type="f32")
    assert report["tensor_types"] == {"F32": 3 + 2 * 12}  # embd, norm, output + 12 per layer (3 biases)
    ids = torch.arange(100) * 3 % len(tok)
    be = _backend(out)
    try:
        got = be.logits(ids)
    finally:
        be.close()
    ref = _torch_logits(folder, ids)
    assert (got - ref).abs().max().item() < 0.01 * ref.std().item()


def test_sentencepiece_style_tokenizer_tokenizes_like_hf(tiny_text_file, tmp_path):
    """A Llama-2-style byte-fallback BPE (``▁`` prefix) exported as a llama.cpp SPM vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import make_tiny_llama

    text = tiny_text_file.read_text()
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator(text.splitlines(), trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    state = json.loads(tk.to_str())  # byte tokens are ordinary vocabulary entries, not added tokens
    state["added_tokens"] = [a for a in state["added_tokens"] if a["id"] < 3]
    tk = Tokenizer.from_str(json.dumps(state))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    folder = tmp_path / "spm"
    tok.save_pretrained(folder)
    make_tiny_llama(len(tok)).save_pretrained(folder)
    out = tmp_path / "spm.gguf"
    assert export_gguf(str(folder), str(out), type="f32")["pre_tokenizer"] == "default"
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    try:
        for line in text.splitlines()[:30] + LINES:
            assert llm.tokenize(line.encode(), add_bos=True, special=False) == tok(line)["input_ids"], line
    finally:
        llm.close()


# --- bad inputs -------------------------------------------------------------------------------------


def test_corrupt_and_truncated_gguf_are_one_line_errors(tiny_f32, tmp_path):
    from llmopt.backends import make_backend

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_f32.read_bytes()[: tiny_f32.stat().st_size // 2])
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(b"GGUF" + os.urandom(200))
    for path in (junk, cut, header_only):
        with pytest.raises(LLMOptError) as e:
            make_backend("gguf", str(path))
        assert "\n" not in str(e.value) and path.name in str(e.value)
    with pytest.raises(LLMOptError, match="no such GGUF"):
        make_backend("gguf", str(tmp_path / "missing.gguf"))


def test_bad_export_arguments_leave_no_file(tiny_model_dir, tiny_f32, tmp_path):
    out = tmp_path / "x.gguf"
    with pytest.raises(LLMOptError, match="unknown --type 'q3_bogus'; valid: auto, f32, f16, q4_0"):
        export_gguf(str(tiny_model_dir), str(out), type="q3_bogus")
    with pytest.raises(LLMOptError, match="unknown --embedding-type"):
        export_gguf(str(tiny_model_dir), str(out), type="f16", embedding_type="q9")
    with pytest.raises(LLMOptError, match="--imatrix only applies"):
        export_gguf(str(tiny_model_dir), str(out), type="f16", imatrix="text:x")
    with pytest.raises(LLMOptError, match="needs an importance matrix"):
        export_gguf(str(tiny_model_dir), str(out), type="iq2_xxs")
    with pytest.raises(LLMOptError, match="already exists; pass --overwrite"):
        export_gguf(str(tiny_model_dir), str(tiny_f32), type="f32")
    assert list(tmp_path.iterdir()) == []
    assert not list(tiny_f32.parent.glob("*.tmp-*"))


def test_unsupported_architecture_is_refused(tiny_model_dir, tmp_path):
    """Refused from config.json alone (the weights are never read), naming the supported architectures."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    folder = tmp_path / "neox"
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    GPTNeoXForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(LLMOptError, match="does not support model_type 'gpt_neox'; supported: llama, mistral, qwen2"):
        export_gguf(str(folder), str(tmp_path / "g.gguf"))
    assert not (tmp_path / "g.gguf").exists() and not list(tmp_path.glob("*.tmp-*"))


def test_cli_export(tiny_model_dir, tmp_path, capsys):
    from llmopt.cli import main

    out = tmp_path / "cli.gguf"
    assert main(["export", str(tiny_model_dir), "--to", "gguf", "--output", str(out), "--type", "q8_0"]) == 0
    assert out.is_file() and "saved" in capsys.readouterr().out
    assert main(["export", str(tiny_model_dir), "--output", str(out), "--type", "f16"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tiny_model_dir), "--output", str(out), "--type", "f16", "--overwrite"]) == 0


# --- bundled model --------------------------------------------------------------------------------


@pytest.mark.integration
def test_bundled_f32_export_matches_torch(tmp_path_factory, wikitext_path):
    from llmopt.backends.torch_backend import TorchBackend
    from llmopt.evaluation import evaluate
    from llmopt.models import load_model

    class Recording(TorchBackend):  # keeps the scored window and its logits: one torch forward in all
        def logits(self, ids):
            self.seen = (ids.clone(), super().logits(ids))
            return self.seen[1]

    out = tmp_path_factory.mktemp("bundled") / "smollm2-f32.gguf"
    report = export_gguf("bundled:smollm2", str(out), type="f32")
    assert report["pre_tokenizer"] == "smollm" and report["tensor_types"] == {"F32": 272}

    loaded = load_model("bundled:smollm2")
    text = wikitext_path.read_text()[:3000]
    hf_ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    data = f"text:{wikitext_path}#0:0.01"  # ~2k tokens; one 256-token window is scored
    torch_be = Recording(loaded.model, "bundled:smollm2")
    a = evaluate(torch_be, data=data, seq_len=256, max_windows=1, progress=False)
    ids, ref = torch_be.seen
    del loaded, torch_be
    be = _backend(out)
    be.model_spec = str(out)  # evaluate tokenizes with the exported GGUF's own tokenizer
    try:
        assert be.llm.tokenize(text.encode(), add_bos=False, special=False) == hf_ids
        got = be.logits(ids)
        b = evaluate(be, data=data, seq_len=256, max_windows=1, progress=False)
    finally:
        be.close()
    # measured: max |diff| 0.03 (F16 KV cache), logit std 5.8; perplexities equal to ~1e-5 (relative)
    assert (got - ref).abs().max().item() < 0.01 * ref.std().item()
    assert b.backend == "gguf"
    assert b.perplexity == pytest.approx(a.perplexity, rel=3e-3)
