"""``--type auto`` of a folder quantized onto a llama.cpp block format writes every tensor without stored codes
in the type llama.cpp's quantizer picks for that file type, so the GGUF has llama.cpp's tensor types and is
never larger than llama.cpp's file of that type."""

from __future__ import annotations

import numpy as np
import pytest

from llmopt.exporters import export_gguf

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.llamacpp


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _nbytes(tensors: dict) -> int:
    return sum(int(t.n_bytes) for t in tensors.values())


def test_head_in_q6_k_comes_from_llama_cpps_quantizer(tiny_text_file, tmp_path):
    """Width 256, separate output head: llama.cpp's Q4_0 file has the head in Q6_K, which the writer cannot
    produce; llama.cpp's quantizer converts it after the writer and copies the rest. RTN q4_0 is llama.cpp's
    reference q4_0 rounding and the head is quantized from the same floats by the same code, so the whole
    file's tensor data equals llama.cpp's Q4_0 of the unquantized model byte for byte."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmopt.compression import compress
    from tests.conftest import make_tiny_tokenizer

    tok = make_tiny_tokenizer(tiny_text_file.read_text())
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    d = tmp_path / "w256"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    ref = tmp_path / "llama-q4_0.gguf"
    export_gguf(str(d), str(ref), type="q4_0")
    folder, out = tmp_path / "rtn", tmp_path / "rtn.gguf"
    compress(str(d), {"stages": [{"stage": "rtn", "format": "q4_0"}]}, folder)
    report = export_gguf(str(folder), str(out), type="auto")
    assert report["tensor_types"] == {"F32": 5, "Q4_0": 15, "Q6_K": 1}  # token_embd Q4_0, output Q6_K
    a, b = _tensors(out), _tensors(ref)
    assert a["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q6_K
    assert set(a) == set(b)
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data), np.asarray(b[name].data)), name
    assert out.stat().st_size <= ref.stat().st_size
    assert not list(tmp_path.glob(".*tmp-*"))

    # --output-type still overrides (written by the writer, no llama.cpp pass)
    explicit = tmp_path / "explicit.gguf"
    r = export_gguf(str(folder), str(explicit), type="auto", output_type="q8_0")
    assert r["tensor_types"] == {"F32": 5, "Q4_0": 15, "Q8_0": 1}
    c = _tensors(explicit)
    assert all(np.array_equal(np.asarray(c[n].data), np.asarray(a[n].data)) for n in a if n != "output.weight")


def _quant_cases() -> dict[tuple[str, str], list[str]]:
    """(format, mixture) of the quantization stage of every shipped recipe that quantizes onto a llama.cpp
    block format → the recipes (mixture "none" where it changes nothing: every format but q4_0 / q5_0)."""
    from llmopt.recipe import parse_recipe, shipped_recipes

    cases: dict[tuple[str, str], list[str]] = {}
    for name, path in shipped_recipes().items():
        for stage in parse_recipe(path).stages:
            fmt = getattr(stage, "format", None)
            if fmt in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"):
                mixture = stage.mixture if fmt in ("q4_0", "q5_0") else "none"
                cases.setdefault((fmt, mixture), []).append(name)
    return cases


@pytest.mark.integration
def test_shipped_recipes_auto_gguf_has_llama_cpps_types_and_is_no_larger(tmp_path):
    """Every shipped recipe whose format is a llama.cpp file type (gptq-q4_0, gptq-q4_1, gptq-q8_0, rtn-*,
    gptq-q4_0-qat, quickstart, minitron-*-q4_0): its ``--type auto`` GGUF of the embedded model has, tensor
    for tensor, the types of llama.cpp's file of that type from the same input, hence no more bytes.

    To keep the test fast each recipe's quantization stage is run as RTN with the same format and mixture:
    the file's types and size depend only on those (which Linears are in which block format), not on the
    codes GPTQ picks. The reference is llama.cpp's own quantizer on the F32 export, with an importance matrix
    when the recipe's mixture is llama.cpp's (its values and entries do not change the types: one tensor's).
    Stages before the quantization are left out: SparseGPT's pruned Linears keep the stage's format (llama.cpp's
    types without an importance matrix: fewer bytes), structured pruning changes the shapes (same rules).
    """
    from llmopt.compression import compress
    from llmopt.exporters.gguf.plan import Plan
    from llmopt.exporters.gguf.quantize import llama_quantize

    cases = _quant_cases()
    assert set(cases) >= {("q4_0", "llama.cpp"), ("q4_0", "none"), ("q4_1", "none"), ("q8_0", "none")}, cases
    assert {"gptq-q4_0", "rtn-q4_0", "gptq-q4_1", "rtn-q4_1", "gptq-q8_0", "rtn-q8_0"} <= set(sum(cases.values(), []))
    f32 = tmp_path / "smollm2-f32.gguf"
    export_gguf("bundled:smollm2", str(f32), type="f32")
    one = {"blk.0.attn_k.weight": np.ones(576, np.float32)}  # has_imatrix: one entry does (and runs fast)
    sizes = {}
    for (fmt, mixture), recipes in sorted(cases.items()):
        ref = tmp_path / f"llama-{fmt}-{mixture}.gguf"
        imatrix = one if mixture == "llama.cpp" else None
        llama_quantize(f32, ref, Plan("llama", fmt, "", ""), imatrix, threads=2)
        folder, out = tmp_path / f"rtn-{fmt}-{mixture}", tmp_path / f"rtn-{fmt}-{mixture}.gguf"
        compress("bundled:smollm2", {"stages": [{"stage": "rtn", "format": fmt, "mixture": mixture}]}, folder)
        export_gguf(str(folder), str(out), type="auto")
        a, b = _tensors(out), _tensors(ref)
        wrong = {
            n: (t.tensor_type.name, b[n].tensor_type.name) for n, t in a.items() if t.tensor_type != b[n].tensor_type
        }
        assert set(a) == set(b) and not wrong, (recipes, wrong)
        assert _nbytes(a) == _nbytes(b), recipes
        assert out.stat().st_size <= ref.stat().st_size, recipes
        sizes[fmt, mixture] = out.stat().st_size / 2**20
        out.unlink()
        ref.unlink()
    # llmopt's q4_0 was 112.8 MiB with an F16 tied embedding; llama.cpp's Q4_0 has it in Q8_0: 87.5 MiB
    assert sizes["q4_0", "none"] == pytest.approx(87.5, abs=0.1), sizes
