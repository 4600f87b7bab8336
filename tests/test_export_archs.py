"""GGUF export of every architecture llama.cpp runs among the test matrix (``tests/tiny_archs.py``).

Per architecture: an F32 export gives llama.cpp the logits torch computes on the same ids (a 48-token
window, longer than the Gemma sliding window of 8); an llmopt RTN q4_0 folder exported with ``--type
auto`` holds the stored codes (GGUF dequantized weights equal the folder's saved weights bit for bit)
and llama.cpp runs it like torch runs the fake-quant folder. OPT (no llama.cpp architecture) and
settings llama.cpp would compute differently are refused with one line before weights are read. Int
formats map onto GGUF types only where the arithmetic is identical; bfloat16 folders export their codes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from llmopt.errors import LLMOptError
from llmopt.exporters import export_gguf
from llmopt.exporters.gguf import unpermute_qk
from tests.conftest import REPO, make_tiny_tokenizer
from tests.tiny_archs import ARCHS, WINDOW, save_tiny_model

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.llamacpp

GGUF_ARCHS = [a for a in ARCHS if a != "opt"]
NO_WINDOW = {"mistral", "qwen2"}  # llama.cpp has no sliding window for these: built without one
GGUF_ARCH = {"mistral": "llama", "gemma3": "gemma3"}
N_TOKENS = 48
assert N_TOKENS > 4 * WINDOW
# measured max |Δlogit| / max |logit| (max |logit| ~15-33): F32 1.5e-4 (gemma) to 1.1e-3 (phi3, qwen2), set by
# llama.cpp's F16 KV cache; q4_0 3e-3 (gemma) to 3.7e-2 (qwen3), llama.cpp's q4_0 matmuls quantizing the
# activations to q8_0 (top-1 agreement 0.90-1.0)
TOL_F32 = 3e-3
TOL_Q4 = 0.06


@pytest.fixture(scope="module")
def tok(tiny_text_file):
    return make_tiny_tokenizer(tiny_text_file.read_text())


@pytest.fixture(scope="module")
def ids(tok, tiny_text_file) -> torch.Tensor:
    text = tiny_text_file.read_text()[5000:8000]
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:N_TOKENS])


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tok):
    made: dict[str, object] = {}

    def get(arch: str):
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            save_tiny_model(arch, folder, tok, sliding=arch not in NO_WINDOW)
            made[arch] = folder
        return made[arch]

    return get


def torch_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(ids.view(1, -1)).logits[0].float()


def gguf_logits(path, ids: torch.Tensor) -> torch.Tensor:
    from llmopt.backends.llamacpp_backend import LlamaCppBackend

    be = LlamaCppBackend(path, threads=2)
    try:
        return be.logits(ids)
    finally:
        be.close()


def rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape
    return (got - ref).abs().max().item() / ref.abs().max().item()


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_f32_export_matches_torch(arch, folders, ids, tmp_path):
    folder = folders(arch)
    out = tmp_path / f"{arch}.gguf"
    report = export_gguf(str(folder), str(out), type="f32")
    assert report["architecture"] == GGUF_ARCH.get(arch, arch) and report["pre_tokenizer"] == "gpt-2"
    assert set(report["tensor_types"]) == {"F32"}
    ref = torch_logits(folder, ids)
    got = gguf_logits(out, ids)
    assert rel_diff(got, ref) < TOL_F32, rel_diff(got, ref)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_tiny_tokenizer_is_split_like_hf(folders, tok, tmp_path):
    """The tiny byte-level BPE is written with pre-tokenizer gpt-2; llama.cpp gives the HF ids."""
    out = tmp_path / "gemma3.gguf"
    export_gguf(str(folders("gemma3")), str(out), type="f32")
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    try:
        for text in ("the city of the river 1990 , ( 3.5 )", "  spaces\tand\n\nnew lines ", "émoji 🚀 我想 'll"):
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text)["input_ids"], text
    finally:
        llm.close()


def _fold(arch: str, cfg: dict) -> float:
    """Gemma2's query scaling ratio folded into attn_q (a power of two for the tiny config)."""
    if arch != "gemma2":
        return 1.0
    hd = cfg["head_dim"]
    return (cfg["query_pre_attn_scalar"] ** -0.5) / (hd**-0.5)


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_q4_0_folder_exports_its_codes(arch, folders, ids, tmp_path):
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    from llmopt.compression import compress

    folder = tmp_path / "q4_0"
    compress(str(folders(arch)), {"stages": [{"stage": "rtn", "format": "q4_0"}]}, folder)  # gpt2: Conv1D
    out = tmp_path / "q4_0.gguf"
    report = export_gguf(str(folder), str(out), type="auto")
    index = json.loads((folder / "quantization.json").read_text())
    assert report["tensor_types"]["Q4_0"] == len(index) and report["linear_bits_per_weight"] == 4.5

    cfg = json.loads((folder / "config.json").read_text())
    n_layer = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[report["architecture"]]
    tmap = gguf.get_tensor_name_map(arch_enum, n_layer)
    saved = load_file(str(folder / "model.safetensors"))
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    heads = {"q_proj": cfg.get("num_attention_heads"), "k_proj": cfg.get("num_key_value_heads")}
    for linear, entry in index.items():
        t = tensors[tmap.get_name(linear + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0, linear
        raw = np.asarray(t.data)
        if arch in ("llama", "mistral") and linear[-6:] in heads:
            raw = unpermute_qk(raw, heads[linear[-6:]])
        W = torch.from_numpy(dequantize(raw, t.tensor_type))
        if linear.endswith("q_proj"):
            W = W / _fold(arch, cfg)  # exact: a power of two
        ref = saved[linear + ".weight"]
        ref = ref.t() if entry.get("transposed") else ref
        assert torch.equal(W.view(torch.int32), ref.contiguous().view(torch.int32)), linear

    got, ref = gguf_logits(out, ids), torch_logits(folder, ids)
    assert rel_diff(got, ref) < TOL_Q4, rel_diff(got, ref)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.85


# --- refused ---------------------------------------------------------------------------------------


def test_opt_is_refused_from_its_config(folders, tmp_path):
    folder = folders("opt")
    (folder / "model.safetensors").rename(folder / "weights.bak")  # the refusal must not need them
    try:
        with pytest.raises(LLMOptError) as e:
            export_gguf(str(folder), str(tmp_path / "opt.gguf"))
        msg = str(e.value)
        assert "\n" not in msg and "'opt'" in msg and "llama.cpp has no OPT" in msg
        assert "supported: llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text, gpt2" in msg
        r = subprocess.run(
            [sys.executable, "-m", "llmopt.cli", "export", str(folder), "--output", str(tmp_path / "c.gguf")],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("error: GGUF export does not support model_type 'opt'")
    finally:
        (folder / "weights.bak").rename(folder / "model.safetensors")
    assert not list(tmp_path.glob("*.gguf*"))


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_sliding_window_llama_cpp_would_ignore_is_refused(arch, tok, tmp_path):
    folder = tmp_path / arch
    save_tiny_model(arch, folder, tok, sliding=True)
    (folder / "model.safetensors").unlink()  # refused from the config alone
    with pytest.raises(LLMOptError, match=f"sliding window of {WINDOW} tokens.*llama.cpp's (llama|qwen2) has no"):
        export_gguf(str(folder), str(tmp_path / "x.gguf"))
    assert not list(tmp_path.glob("*.gguf*"))


def test_window_as_long_as_the_context_only_warns(tok, tmp_path, caplog):
    folder = tmp_path / "mistral"
    save_tiny_model("mistral", folder, tok, sliding=True)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["sliding_window"] = cfg["max_position_embeddings"]
    (folder / "config.json").write_text(json.dumps(cfg))
    export_gguf(str(folder), str(tmp_path / "m.gguf"), type="f32")
    assert "never applies" in caplog.text


# --- int formats: exact GGUF types or a one-line refusal -------------------------------------------


def _int_folder(tiny_model_dir, tmp_path, bits: int, group: int, symmetric: bool = True):
    from llmopt.compression import compress

    folder = tmp_path / f"int{bits}g{group}{'' if symmetric else 'a'}"
    stage = {"stage": "rtn", "format": "int", "bits": bits, "group_size": group, "symmetric": symmetric}
    compress(str(tiny_model_dir), {"stages": [stage]}, folder)
    return folder


def _assert_gguf_equals_folder(folder, out, qtype):
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    index = json.loads((folder / "quantization.json").read_text())
    saved = load_file(str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    for linear in index:
        t = tensors[tmap.get_name(linear + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type == qtype, linear
        raw = np.asarray(t.data)
        if linear[-6:] in heads:
            raw = unpermute_qk(raw, heads[linear[-6:]])
        W = torch.from_numpy(dequantize(raw, t.tensor_type))
        assert torch.equal(W.view(torch.int32), saved[linear + ".weight"].view(torch.int32)), linear


@pytest.mark.parametrize("group", [32, 64])
def test_symmetric_int4_is_written_as_q4_0_exactly(group, tiny_model_dir, tmp_path):
    """value = s·(q − 8) is q4_0 with d = s; a group of 64 is two q4_0 blocks sharing d."""
    folder = _int_folder(tiny_model_dir, tmp_path, 4, group)
    out = tmp_path / "int4.gguf"
    report = export_gguf(str(folder), str(out), type="auto")
    assert report["tensor_types"] == {"Q4_0": 14, "F16": 1, "F32": 5}  # Linears, embedding, norms
    _assert_gguf_equals_folder(folder, out, gguf.GGMLQuantizationType.Q4_0)


@pytest.mark.parametrize(("bits", "group", "why"), [(3, 32, "no 3-bit block type"), (4, 16, "groups of 16")])
def test_int_format_without_exact_gguf_type_is_refused(bits, group, why, tiny_model_dir, tmp_path):
    folder = _int_folder(tiny_model_dir, tmp_path, bits, group)
    out = tmp_path / "x.gguf"
    with pytest.raises(LLMOptError) as e:
        export_gguf(str(folder), str(out), type="auto")
    msg = str(e.value)
    assert (
        "\n" not in msg
        and why in msg
        and all(f in msg for f in ("q4_0", "q8_0", "q4_K", "iq4_nl"))
        and "--type f32" in msg
    )
    assert not out.exists() and not list(tmp_path.glob("*.tmp-*"))
    report = export_gguf(str(folder), str(out), type="f32")  # asked for explicitly: plain floats
    assert set(report["tensor_types"]) == {"F32"}


def _stored(fmt_name: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, **kw):
    from llmopt.exporters.gguf.codes import StoredLinear
    from llmopt.formats import QParams, make_format

    return StoredLinear(make_format(fmt_name, **kw), codes, QParams(scale, zero))


def test_int_mappings_are_checked_bit_for_bit():
    from gguf.quants import dequantize

    from llmopt.exporters.gguf.codes import to_blocks

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 32, (4, 64), generator=g, dtype=torch.uint8)
    scale = torch.tensor([[0.0123, 0.5]] * 4).half().float()
    # int5 sym g32 → q5_0
    s = _stored("int", codes, scale, torch.full_like(scale, 16), bits=5, group_size=32)
    blocks, qtype = to_blocks("x", s)
    assert qtype == gguf.GGMLQuantizationType.Q5_0
    assert torch.equal(torch.from_numpy(dequantize(blocks, qtype)), s.dequantize())
    # int4 asym g32 → q4_1 when m = −s·z is an fp16 number, refused when it is not
    c4 = codes % 16
    pow2 = torch.tensor([[0.25, 0.0625]] * 4)
    s = _stored("int", c4, pow2, torch.full_like(pow2, 5), bits=4, group_size=32, symmetric=False)
    blocks, qtype = to_blocks("x", s)
    assert qtype == gguf.GGMLQuantizationType.Q4_1
    assert torch.equal(torch.from_numpy(dequantize(blocks, qtype)), s.dequantize())
    s = _stored("int", c4, scale, torch.full_like(scale, 13), bits=4, group_size=32, symmetric=False)
    with pytest.raises(LLMOptError, match="not an fp16 number"):
        to_blocks("x", s)
    # int8 sym → q8_0 unless a code is 0 (value −128·s)
    c8 = torch.randint(1, 256, (4, 64), generator=g, dtype=torch.uint8)
    s = _stored("int", c8, scale, torch.full_like(scale, 128), bits=8, group_size=32)
    blocks, qtype = to_blocks("x", s)
    assert qtype == gguf.GGMLQuantizationType.Q8_0
    assert torch.equal(torch.from_numpy(dequantize(blocks, qtype)), s.dequantize())
    c8[0, 0] = 0
    with pytest.raises(LLMOptError, match="q8_0 .−127..127. cannot hold"):
        to_blocks("x", _stored("int", c8, scale, torch.full_like(scale, 128), bits=8, group_size=32))


# --- bfloat16 folders --------------------------------------------------------------------------------


def _bf16_copy(src, dst, quantized_in_f32: bool):
    """``src`` saved again in bfloat16; the quantized Linears either in float32 (exact) or rounded to bf16."""
    import shutil

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    index = json.loads((src / "quantization.json").read_text())
    keep = {n: model.get_submodule(n).weight.data.clone() for n in index}
    model = model.to(torch.bfloat16)
    if quantized_in_f32:
        for n, w in keep.items():
            model.get_submodule(n).weight = torch.nn.Parameter(w, requires_grad=False)
    model.save_pretrained(dst, safe_serialization=True)
    for f in ("quantization.json", "quantization.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    for f in src.glob("special_tokens_map.json"):
        shutil.copy(f, dst / f.name)
    return keep


@pytest.mark.parametrize("quantized_in_f32", [True, False])
def test_bf16_folder_exports_the_codes(quantized_in_f32, tiny_model_dir, tmp_path):
    from gguf.quants import dequantize
    from safetensors import safe_open

    from llmopt.compression import compress

    q4 = tmp_path / "q4"
    compress(str(tiny_model_dir), {"stages": [{"stage": "rtn", "format": "q4_0"}]}, q4)
    folder = tmp_path / "bf16"
    exact = _bf16_copy(q4, folder, quantized_in_f32)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        emb_dtype = f.get_slice("model.embed_tokens.weight").get_dtype()
        q_dtype = f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype()
    assert emb_dtype == "BF16" and q_dtype == ("F32" if quantized_in_f32 else "BF16")
    out = tmp_path / "bf16.gguf"
    report = export_gguf(str(folder), str(out), type="auto")
    assert report["tensor_types"] == {"Q4_0": 14, "Q8_0": 1, "F32": 5}  # the embedding: llama.cpp's Q4_0 type
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    t = tensors["blk.1.ffn_down.weight"]
    W = torch.from_numpy(dequantize(np.asarray(t.data), t.tensor_type))
    assert torch.equal(W, exact["model.layers.1.mlp.down_proj"])  # the codes' values, not a bf16 rounding

    # a weight the codes do not reproduce (in the saved dtype) is refused
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    weights[name] = weights[name] * 1.5
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LLMOptError, match="stored codes of model.layers.0.mlp.up_proj do not reproduce"):
        export_gguf(str(folder), str(tmp_path / "bad.gguf"), type="auto")


def test_compress_dtype_bfloat16_folder_exports_its_codes(folders, tmp_path):
    """The same through ``compress(..., dtype="bfloat16")`` (quantized Linears saved in float32)."""
    from gguf.quants import dequantize

    from llmopt.compression import compress
    from llmopt.exporters.gguf.codes import load_stored

    folder = tmp_path / "gemma2-bf16"
    compress(str(folders("gemma2")), {"stages": [{"stage": "rtn", "format": "q4_0"}]}, folder, dtype="bfloat16")
    out = tmp_path / "gemma2-bf16.gguf"
    report = export_gguf(str(folder), str(out), type="auto")
    stored = load_stored(folder)
    assert report["tensor_types"]["Q4_0"] == len(stored) and report["tensor_types"]["Q8_0"] == 1  # the embedding
    cfg = json.loads((folder / "config.json").read_text())
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA2, cfg["num_hidden_layers"])
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for linear, s in stored.items():
        t = tensors[tmap.get_name(linear + ".weight", try_suffixes=(".weight",))]
        W = torch.from_numpy(dequantize(np.asarray(t.data), t.tensor_type))
        want = s.dequantize() * (_fold("gemma2", cfg) if linear.endswith("q_proj") else 1.0)
        assert torch.equal(W, want), linear
