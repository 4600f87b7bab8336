"""Tests for llmopt.models: spec resolution, GGUF conversion cache, and llama.cpp tokenizer/logit fidelity.

Tests marked ``integration`` load the bundled SmolLM2-135M GGUF; the first run converts it into
``${LLMOPT_CACHE:-~/.cache/llmopt}/gguf`` (about 15-60 s), later runs reuse that folder.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import llmopt.models as models
from llmopt.errors import LLMOptError
from llmopt.models import (
    LoadedModel,
    bundled_gguf_path,
    load_model,
    load_tokenizer,
    resolve_local_folder,
)

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared/data/wikitext-2/valid.nounk.txt"

# Digits, decimal points, runs of spaces and newlines, tabs, accents, CJK, emoji, code, contractions,
# non-ASCII numerals (\p{N}), CRLF, and a leading and trailing space.
HAND_TEXT = (
    " leading space 1234567 and 3.14, x=10_000;  multiple   spaces\n\n\nnewlines\tafter tab\n"
    "é café naïve Ünïcödé 中文 日本語 한국어 emoji 🤗🎉👍🏽\n"
    "def f(x):\n    return x**2  # comment\n\nif a != b and c <= 0x1F: print(f'{a!r}')\n"
    "<b>tag</b> it's I'LL we've they'd 2nd 1st 1,000,000 ١٢٣ ½ ² ⅷ\r\n end  "
)
CHAT_TEXT = "<|im_start|>user\nWhat is 12+30?<|im_end|>\n<|im_start|>assistant\n"
PROMPT = (
    "The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building, and the "
    "tallest structure in Paris. Its base is square, measuring 125 metres (410 ft) on each side. During "
    "its construction, the Eiffel Tower surpassed the Washington Monument to become the"
)


def _one_line(e: pytest.ExceptionInfo[LLMOptError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _needs_bundled() -> str:
    try:
        return bundled_gguf_path()
    except LLMOptError as e:
        pytest.skip(f"bundled model unavailable: {e}")


def _wikitext_slices() -> dict[str, str]:
    if not WIKITEXT.is_file():
        pytest.skip(f"wikitext-2 not found at {WIKITEXT} (shared/data is not checked out)")
    text = WIKITEXT.read_text(encoding="utf-8")
    mid = len(text) // 2
    return {"head": text[:8192], "middle": text[mid : mid + 8192]}


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def bundled() -> LoadedModel:
    """The bundled model, loaded once (converted into the user cache the first time)."""
    _needs_bundled()
    t0 = time.perf_counter()
    lm = load_model("bundled:smollm2")
    print(f"\nload_model('bundled:smollm2'): {time.perf_counter() - t0:.1f} s")
    return lm


@pytest.fixture(scope="module")
def llama_vocab() -> Iterator[object]:
    """llama.cpp's tokenizer for the bundled GGUF (vocabulary only, no weights)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=_needs_bundled(), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture()
def tiny_folder(tmp_path: Path) -> tuple[Path, LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A tiny random Llama saved as safetensors with a byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


# --------------------------------------------------------------------------------------------------
# Spec errors (fast)


def test_bundled_path_points_at_the_gguf() -> None:
    path = Path(_needs_bundled())
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"


def test_unknown_bundled_name_lists_valid_names() -> None:
    with pytest.raises(LLMOptError) as e:
        load_model("bundled:llama9000")
    assert "bundled:smollm2" in _one_line(e)
    with pytest.raises(LLMOptError, match="bundled:smollm2"):
        bundled_gguf_path("nope")


@pytest.mark.parametrize("spec", ["./nope", "/tmp/llmopt-no-such-dir/x.gguf", "missing.gguf", "~/no/such/folder"])
def test_nonexistent_path(spec: str) -> None:
    with pytest.raises(LLMOptError) as e:
        load_model(spec)
    assert "no such file or folder" in _one_line(e)


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(LLMOptError) as e:
        load_model(str(tmp_path))
    assert "config.json" in _one_line(e)


def test_plain_file_is_not_a_model(tmp_path: Path) -> None:
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    with pytest.raises(LLMOptError) as e:
        load_model(str(f))
    assert "not a .gguf" in _one_line(e)


def _assert_invalid_gguf(path: Path, cache: Path) -> None:
    for fn in (load_model, load_tokenizer, resolve_local_folder):
        t0 = time.perf_counter()
        with pytest.raises(LLMOptError) as e:
            fn(str(path), cache_dir=str(cache))
        assert time.perf_counter() - t0 < 20
        msg = _one_line(e)
        assert "is not a valid GGUF file" in msg and "re-download" in msg, msg
    leftovers = list(cache.rglob("*")) if cache.exists() else []
    assert not leftovers, f"cache not clean after a failed conversion: {leftovers}"


def test_random_bytes_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "random.gguf"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes())
    _assert_invalid_gguf(bad, tmp_path / "cache")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _assert_invalid_gguf(empty, tmp_path / "cache")


@pytest.mark.parametrize("cut", ["first_1MB", "half"])
def test_truncated_gguf(tmp_path: Path, cut: str) -> None:
    src = Path(_needs_bundled())
    size = 1 << 20 if cut == "first_1MB" else src.stat().st_size // 2
    bad = tmp_path / f"{cut}.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(size))
    _assert_invalid_gguf(bad, tmp_path / "cache")


def test_failed_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversion that dies half-way (after the tokenizer, inside the loader) leaves no cache entry."""
    _needs_bundled()

    def unsupported(*args: object, **kwargs: object) -> None:
        raise ValueError("GGUF model with architecture llama is not supported yet.")

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    cache = tmp_path / "cache"
    monkeypatch.setattr(models.gguf_cache.AutoModelForCausalLM, "from_pretrained", unsupported)
    with pytest.raises(LLMOptError) as e:
        load_model("bundled:smollm2", cache_dir=str(cache))
    assert "cannot dequantize" in _one_line(e)
    assert not [p for p in (cache / "gguf").iterdir()]
    monkeypatch.setattr(models.gguf_cache.AutoModelForCausalLM, "from_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        load_model("bundled:smollm2", cache_dir=str(cache))
    assert not [p for p in (cache / "gguf").iterdir()]


def test_hub_id_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not cached + no Hub: a one-line error well within the time huggingface_hub's retries take (~25 s)."""
    spec = "llmopt-test/definitely-not-a-real-model-3141"
    t0 = time.perf_counter()
    with pytest.raises(LLMOptError) as e:
        load_model(spec)
    elapsed = time.perf_counter() - t0
    assert elapsed < 15, f"Hub failure took {elapsed:.1f} s"
    assert f"model '{spec}' not found" in _one_line(e)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    for fn in (load_model, load_tokenizer):
        with pytest.raises(LLMOptError) as e:
            fn(spec)
        assert "could not be reached (offline?)" in _one_line(e)
    assert time.perf_counter() - t0 < 5


def test_invalid_hub_id() -> None:
    with pytest.raises(LLMOptError) as e:
        load_model("not a model id")
    assert "valid Hub model id" in _one_line(e)


# --------------------------------------------------------------------------------------------------
# Local HF folders


def test_local_folder_round_trip(tiny_folder: tuple[Path, LlamaForCausalLM, PreTrainedTokenizerFast]) -> None:
    folder, ref_model, ref_tok = tiny_folder
    lm = load_model(str(folder))
    assert lm.path == str(folder.resolve()) and lm.gguf_path is None and lm.spec == str(folder)
    assert resolve_local_folder(str(folder)) == str(folder.resolve())
    assert not lm.model.training
    assert next(lm.model.parameters()).dtype == torch.float32
    assert next(lm.model.parameters()).device.type == "cpu"
    text = "hello world 123"
    ids = lm.tokenizer(text).input_ids
    assert ids == ref_tok(text).input_ids == load_tokenizer(str(folder))(text).input_ids
    x = torch.tensor([ids])
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(x).logits, ref_model(x).logits, rtol=0, atol=0)

    half = load_model(str(folder), dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_hub_id_from_offline_cache(
    tiny_folder: tuple[Path, LlamaForCausalLM, PreTrainedTokenizerFast],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Hub id already in the HF cache (laid out as huggingface_hub does) loads with HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants

    folder, ref_model, _ = tiny_folder
    hub = tmp_path / "hub"
    repo = hub / "models--llmopt-test--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    lm = load_model("llmopt-test/tiny-llama")
    assert Path(lm.path) == repo / "snapshots" / commit and lm.gguf_path is None
    x = torch.tensor([lm.tokenizer("offline").input_ids])
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(x).logits, ref_model(x).logits, rtol=0, atol=0)
    assert load_tokenizer("llmopt-test/tiny-llama")("abc").input_ids == lm.tokenizer("abc").input_ids


def test_pytorch_bin_only_folder_is_refused(
    tiny_folder: tuple[Path, LlamaForCausalLM, PreTrainedTokenizerFast], tmp_path: Path
) -> None:
    _, model, tokenizer = tiny_folder
    folder = tmp_path / "bin_only"
    model.save_pretrained(folder, safe_serialization=False)
    tokenizer.save_pretrained(folder)
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    with pytest.raises(LLMOptError) as e:
        load_model(str(folder))
    assert "safetensors only" in _one_line(e)


def test_bad_device(tiny_folder: tuple[Path, LlamaForCausalLM, PreTrainedTokenizerFast]) -> None:
    folder = str(tiny_folder[0])
    with pytest.raises(LLMOptError) as e:
        load_model(folder, device="gpu7")
    assert "invalid device" in _one_line(e)
    if not torch.cuda.is_available():
        with pytest.raises(LLMOptError, match="no CUDA"):
            load_model(folder, device="cuda")


# --------------------------------------------------------------------------------------------------
# Bundled GGUF: tokenizer fidelity, cache, logits (integration)


def _texts() -> dict[str, str]:
    return {**_wikitext_slices(), "hand": HAND_TEXT}


@pytest.mark.integration
@pytest.mark.llamacpp
@pytest.mark.parametrize("name", ["head", "middle", "hand"])
def test_tokenizer_matches_llama_cpp(bundled: LoadedModel, llama_vocab: object, name: str) -> None:
    text = {"hand": HAND_TEXT}.get(name) or _wikitext_slices()[name]
    ref = llama_vocab.tokenize(text.encode(), add_bos=False, special=False)  # type: ignore[attr-defined]
    # llama.cpp's default (add_bos=True) adds BOS only when the GGUF asks; this one does not.
    assert llama_vocab.tokenize(text.encode()) == ref  # type: ignore[attr-defined]
    ids = bundled.tokenizer(text).input_ids
    assert len(ids) == len(ref)
    assert ids == ref


@pytest.mark.integration
@pytest.mark.llamacpp
def test_special_tokens_match_llama_cpp(bundled: LoadedModel, llama_vocab: object) -> None:
    tok = bundled.tokenizer
    parsed = llama_vocab.tokenize(CHAT_TEXT.encode(), add_bos=False, special=True)  # type: ignore[attr-defined]
    literal = llama_vocab.tokenize(CHAT_TEXT.encode(), add_bos=False, special=False)  # type: ignore[attr-defined]
    assert tok(CHAT_TEXT).input_ids == parsed
    assert tok(CHAT_TEXT, split_special_tokens=True).input_ids == literal
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )


@pytest.mark.integration
def test_no_bos_and_decode_round_trip(bundled: LoadedModel) -> None:
    tok = bundled.tokenizer
    ids = tok("Hello world").input_ids
    assert tok.bos_token_id not in ids and ids[0] != 1
    assert tok.decode(tok(HAND_TEXT).input_ids) == HAND_TEXT


@pytest.mark.integration
def test_saved_tokenizer_round_trips(bundled: LoadedModel) -> None:
    folder = Path(bundled.path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["add_bos_token"] is False
    tj = json.loads((folder / "tokenizer.json").read_text())
    assert [p["type"] for p in tj["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert tj["post_processor"]["type"] == "ByteLevel"  # no BOS template

    fresh = AutoTokenizer.from_pretrained(folder)
    assert type(fresh) is PreTrainedTokenizerFast
    assert fresh.chat_template and "<|im_start|>" in fresh.chat_template
    for text in [*_texts().values(), CHAT_TEXT]:
        assert fresh(text).input_ids == bundled.tokenizer(text).input_ids
    assert fresh("Hello").input_ids == bundled.tokenizer("Hello").input_ids == [19556]
    assert load_tokenizer("bundled:smollm2")(HAND_TEXT).input_ids == bundled.tokenizer(HAND_TEXT).input_ids


@pytest.mark.integration
def test_tokenizer_without_conversion(bundled: LoadedModel, tmp_path: Path) -> None:
    """load_tokenizer on an unconverted GGUF builds it from the metadata: fast, nothing cached."""
    cache = tmp_path / "cache"
    t0 = time.perf_counter()
    tok = load_tokenizer("bundled:smollm2", cache_dir=str(cache))
    assert time.perf_counter() - t0 < 30
    assert not cache.exists()
    for text in [*_texts().values(), CHAT_TEXT]:
        assert tok(text).input_ids == bundled.tokenizer(text).input_ids


@pytest.mark.integration
def test_cached_folder_is_reused(bundled: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path(bundled.path)
    assert bundled.gguf_path == bundled_gguf_path()
    provenance = json.loads((folder / "llmopt_gguf.json").read_text())
    assert provenance["gguf_path"] == bundled.gguf_path
    assert provenance["tokenizer.ggml.pre"] == "smollm" and provenance["add_bos_token"] is False
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.parent.glob(".tmp-*"))
    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def no_reconversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(models.gguf_cache, "_convert_gguf", no_reconversion)
    t0 = time.perf_counter()
    again = load_model("bundled:smollm2")
    elapsed = time.perf_counter() - t0
    print(f"\ncached load_model('bundled:smollm2'): {elapsed:.2f} s")
    assert elapsed < 20
    assert again.path == bundled.path and (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert resolve_local_folder(bundled.gguf_path) == bundled.path
    w0 = bundled.model.model.layers[3].mlp.down_proj.weight
    torch.testing.assert_close(again.model.model.layers[3].mlp.down_proj.weight, w0, rtol=0, atol=0)


def _llama_cpp_logits(gguf: str, ids: list[int]) -> np.ndarray:
    pytest.importorskip("llama_cpp")
    from llmopt.backends.llamacpp_probe import open_llama

    llm = open_llama(gguf, logits_all=True, n_ctx=256, n_threads=1, verbose=False)  # no AMX crash
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)  # (L, V)
    finally:
        llm.close()


def _torch_logits(lm: LoadedModel, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return lm.model(torch.tensor([ids])).logits[0].float().numpy()  # (L, V)


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p = torch.log_softmax(torch.from_numpy(p_logits), -1)
    q = torch.log_softmax(torch.from_numpy(q_logits), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.integration
@pytest.mark.llamacpp
def test_logits_close_to_llama_cpp(bundled: LoadedModel) -> None:
    """torch on the dequantized weights vs llama.cpp on the Q4_1 file.

    llama.cpp multiplies Q4_1 weights by activations quantized to 8 bits (Q8_1), so it is not exact:
    measured max |Δ| ≈ 0.9 over the last 8 rows (logit std ≈ 6), KL ≈ 0.003 nats. A conversion bug
    (wrong RoPE permutation, norm eps, tied head) shows up as Δ of several units and KL ≫ 0.1.
    """
    ids = bundled.tokenizer(PROMPT).input_ids
    ref = _llama_cpp_logits(bundled.gguf_path, ids)[-8:]
    out = _torch_logits(bundled, ids)[-8:]
    diff = np.abs(out - ref)
    kl = _kl(ref, out)
    print(
        f"\nQ4_1 llama.cpp vs torch, last 8 of {len(ids)} rows: max|Δ|={diff.max():.3f} "
        f"mean|Δ|={diff.mean():.3f} logit std={ref.std():.2f} KL={kl:.5f}"
    )
    assert diff.max() < 0.35 * ref.std()
    assert diff.mean() < 0.05 * ref.std()
    assert kl < 0.02
    assert out[-1].argmax() == ref[-1].argmax()


@pytest.mark.integration
@pytest.mark.llamacpp
def test_conversion_is_exact_against_f32_gguf(bundled: LoadedModel, tmp_path: Path) -> None:
    """Re-encode the same dequantized tensors as an F32 GGUF: llama.cpp then agrees with torch to ~1e-2.

    This separates conversion errors (which would remain) from llama.cpp's quantized arithmetic.
    """
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    reader = GGUFReader(bundled.gguf_path)
    f32 = tmp_path / "f32.gguf"
    writer = GGUFWriter(f32, "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml (ne0, ne1) → numpy (rows, cols)
        writer.add_tensor(t.name, dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    del reader

    ids = bundled.tokenizer(PROMPT).input_ids
    try:
        ref = _llama_cpp_logits(str(f32), ids)
    finally:
        f32.unlink()  # 540 MB
    out = _torch_logits(bundled, ids)
    diff = np.abs(out - ref)
    print(f"\nF32 llama.cpp vs torch, {len(ids)} rows: max|Δ|={diff.max():.4f} KL={_kl(ref, out):.2e}")
    assert diff.max() < 0.1
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_llmopt_does_not_drag_in_scikit_learn_or_scipy():
    """transformers imports scikit-learn, scipy and pandas with its model classes whenever they are
    installed (lm-eval installs them): ~140 MiB per process for features llmopt never uses. llmopt's
    import-time settings (llmopt.hf_imports) keep them out."""
    import subprocess
    import sys

    code = (
        "import sys, llmopt.models, llmopt.compression;"
        "print(','.join(m for m in ('sklearn', 'scipy', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
