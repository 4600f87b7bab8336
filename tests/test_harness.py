"""``llmopt harness``: lm-evaluation-harness tasks on torch (lm-eval's HFLM), on the model's F32 GGUF export
(llama.cpp in process) and on its ONNX export (ONNX Runtime), offline, with the local tasks in
``tests/data/harness/`` (JSONL data next to the YAMLs).

Properties: the three runtimes see the same token ids; per-document log-likelihoods agree to 1e-3 and
accuracies within one standard error; greedy generations agree; a rolling log-likelihood equals
``llmopt.evaluate`` on the same ids. The model is a tiny random Llama with transformers' own init (std
0.02). The GGUF is scored with an F32 KV cache (``kv_cache="f32"``: F32 end to end, ≤ 2e-5 from torch
here); llama.cpp's default F16 cache moves each token's log-probability by up to ~2e-4 on this model
(~0.02 on the sharper std-0.15 test models), which documents of ~100 tokens in many windows sum to
~1e-3, so the default run is checked on single windows.

Windows. lm-eval scores every token of a document, the first one given its prefix token (BOS), in
windows of ``max_length`` predictions; ``llmopt eval`` cuts the token stream into non-overlapping
windows and scores all but the first token of each. They coincide for a document shorter than one
window when llmopt's text starts with that BOS: its one window ``[BOS, t0 … t(n-1)]`` scores
``t0 … t(n-1)`` with the same contexts, so exp(−LL / n) from the harness is llmopt's perplexity.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llmopt
from llmopt.cli import main
from llmopt.errors import LLMOptError

pytest.importorskip("lm_eval")
llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

TASKS = Path(__file__).parent / "data" / "harness"
MC, ROLL, GEN = "llmopt_tiny_mc", "llmopt_tiny_rolling", "llmopt_tiny_gen"
LL_ATOL = 1e-3


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # the runs below set one thread, process-wide


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_text_file):
    """A 3-layer hidden-64 random Llama (transformers' init, std 0.02) with the tiny BPE tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_tokenizer
    from tests.tiny_archs import tiny_config

    d = tmp_path_factory.mktemp("harness-llama")
    tok = make_tiny_tokenizer(tiny_text_file.read_text())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok))).eval()
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def gguf_file(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("harness-gguf") / "tiny-f32.gguf"
    llmopt.export(str(model_dir), to="gguf", output=str(out), type="f32")
    return out


def _run(model, tasks, **kw):
    # one thread: llama.cpp's worker threads spin at barriers, which crawls on a busy 2-core machine
    return llmopt.harness(str(model), tasks, include_path=TASKS, documents=True, progress=False, threads=1, **kw)


@pytest.fixture(scope="module")
def runs(model_dir, gguf_file):
    """The three tasks on torch and on the GGUF with an F32 KV cache (F32 end to end), the two scored
    ones with llama.cpp's default F16 cache, and the rolling task with max_length 24 (every document
    then spans several windows)."""
    tasks = [MC, ROLL, GEN]
    return {
        "torch": _run(model_dir, tasks),
        "gguf": _run(gguf_file, tasks, kv_cache="f32"),
        "gguf_f16": _run(gguf_file, [MC, ROLL]),
        "torch24": _run(model_dir, ROLL, max_length=24),
        "gguf24": _run(gguf_file, ROLL, max_length=24, kv_cache="f32"),
    }


def _lls(task: dict) -> list[float]:
    return [x for d in task["documents"] for x in d.get("loglikelihoods", [d.get("loglikelihood")])]


def _assert_same_scores(a: dict, b: dict, task: str, atol: float = LL_ATOL) -> None:
    ta, tb = a["tasks"][task], b["tasks"][task]
    assert ta["n_samples"] == tb["n_samples"] == len(ta["documents"]) > 0
    assert [d["doc_id"] for d in ta["documents"]] == [d["doc_id"] for d in tb["documents"]]
    la, lb = _lls(ta), _lls(tb)
    assert len(la) == len(lb) and max(abs(x - y) for x, y in zip(la, lb)) < atol
    if "tokens" in ta["documents"][0]:
        assert [d["tokens"] for d in ta["documents"]] == [d["tokens"] for d in tb["documents"]]


def test_torch_and_gguf_see_the_same_token_ids(model_dir, gguf_file):
    """The BOS trap: HFLM with llmopt's tokenizer and the llama.cpp LM with the GGUF's tokenizer encode,
    prefix and window identically (neither adds a BOS; both condition on BOS as the prefix token)."""
    from llmopt.harness.llamacpp_lm import LlamaCppLM
    from llmopt.harness.torch_lm import torch_lm
    from llmopt.models import load_model

    hf = torch_lm(load_model(str(model_dir)))
    cpp = LlamaCppLM.from_spec(str(gguf_file), threads=1)
    try:
        texts = [json.loads(line)["text"] for line in (TASKS / "tiny_rolling.jsonl").read_text().splitlines()]
        for text in texts + ["<s> starts with the BOS text", "émoji 🚀 1990 @-@"]:
            assert hf.tok_encode(text) == cpp.tok_encode(text)
            assert cpp.engine.llm.tokenize(text.encode(), add_bos=False, special=True) == cpp.tok_encode(text)
        assert (hf.prefix_token_id, hf.eot_token_id, hf.max_length) == (cpp.prefix_token_id, cpp.eot_token_id, 512)
        assert hf.tok_encode("a b")[0] != hf.prefix_token_id  # the tokenizer adds no BOS ...
        assert cpp.engine.llm.metadata.get("tokenizer.ggml.add_bos_token") == "false"  # ... nor does llama.cpp
    finally:
        cpp.engine.close()


def test_multiple_choice_torch_vs_gguf(runs):
    a, b = runs["torch"], runs["gguf"]
    assert (a["backend"], b["backend"]) == ("torch", "gguf") and a["kind"] == "lm-eval-harness"
    _assert_same_scores(a, b, MC)
    for metric in ("acc", "acc_norm"):
        ma, mb = a["tasks"][MC]["metrics"][metric], b["tasks"][MC]["metrics"][metric]
        assert ma["stderr"] > 0 and abs(ma["value"] - mb["value"]) <= ma["stderr"]
    assert a["tasks"][MC]["n_samples"] == a["tasks"][MC]["n_documents"] == 24


def test_default_f16_kv_cache_agrees_on_single_windows(runs):
    a, b = runs["torch"], runs["gguf_f16"]
    assert b["kv_cache"] == "f16" and runs["gguf"]["kv_cache"] == "f32" and a["kv_cache"] is None
    for task in (MC, ROLL):
        _assert_same_scores(a, b, task)
    for metric in ("acc", "acc_norm"):
        ma, mb = a["tasks"][MC]["metrics"][metric], b["tasks"][MC]["metrics"][metric]
        assert abs(ma["value"] - mb["value"]) <= ma["stderr"]


def test_rolling_torch_vs_gguf_one_and_several_windows(runs):
    _assert_same_scores(runs["torch"], runs["gguf"], ROLL)
    _assert_same_scores(runs["torch24"], runs["gguf24"], ROLL)
    docs = runs["torch24"]["tasks"][ROLL]["documents"]
    assert all(d["tokens"] > 24 for d in docs)  # several windows each
    # one window of full context vs windows of 24: different numbers, same tokens scored
    assert [d["tokens"] for d in docs] == [d["tokens"] for d in runs["torch"]["tasks"][ROLL]["documents"]]
    assert docs[0]["loglikelihood"] != pytest.approx(runs["torch"]["tasks"][ROLL]["documents"][0]["loglikelihood"])
    for key in ("word_perplexity", "byte_perplexity", "token_perplexity"):
        va = runs["torch"]["tasks"][ROLL]["metrics"][key]["value"]
        assert runs["gguf"]["tasks"][ROLL]["metrics"][key]["value"] == pytest.approx(va, rel=1e-4)


def test_greedy_generation_torch_vs_gguf(runs):
    gens = {k: [d["generation"] for d in runs[k]["tasks"][GEN]["documents"]] for k in ("torch", "gguf")}
    assert len(gens["torch"]) == 4 and all(isinstance(g, str) and "\n" not in g for g in gens["torch"])
    assert gens["torch"] == gens["gguf"]


def test_rolling_perplexity_equals_llmopt_evaluate(runs, model_dir, tmp_path):
    """Per document (shorter than the 512-token window): exp(−LL / tokens) from the harness equals
    ``llmopt.evaluate`` on a text file holding ``<s>`` + the document, in one window of tokens + 1."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in (TASKS / "tiny_rolling.jsonl").read_text().splitlines()]
    for doc in runs["torch"]["tasks"][ROLL]["documents"]:
        text = texts[doc["doc_id"]]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == doc["tokens"] < 512
        assert tok("<s>" + text, add_special_tokens=False)["input_ids"] == [tok.bos_token_id, *ids]
        path = tmp_path / f"doc{doc['doc_id']}.txt"
        path.write_text("<s>" + text)
        r = llmopt.evaluate(str(model_dir), data=f"text:{path}", seq_len=len(ids) + 1, progress=False)
        assert (r.windows, r.tokens_scored) == (1, len(ids))
        assert r.perplexity == pytest.approx(math.exp(-doc["loglikelihood"] / doc["tokens"]), rel=1e-5)
    t = runs["torch"]["tasks"][ROLL]
    ll = sum(d["loglikelihood"] for d in t["documents"])
    assert t["tokens_scored"] == sum(d["tokens"] for d in t["documents"])
    assert t["metrics"]["token_perplexity"]["value"] == pytest.approx(math.exp(-ll / t["tokens_scored"]))


def test_onnx_export_agrees_with_torch(runs, model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("optimum.exporters.onnx")
    onnx_dir = tmp_path / "onnx"
    llmopt.exporters.export_onnx(str(model_dir), str(onnx_dir))
    r = _run(onnx_dir, [MC, ROLL, GEN])
    assert r["backend"] == "onnx" and r["max_length"] == 512
    for task in (MC, ROLL):
        _assert_same_scores(runs["torch"], r, task)
    assert [d["generation"] for d in r["tasks"][GEN]["documents"]] == [
        d["generation"] for d in runs["torch"]["tasks"][GEN]["documents"]
    ]


def test_cli_json_limit_and_model_card(model_dir, tmp_path, capsys):
    from llmopt.hub.card import build_card

    out = tmp_path / "card-folder" / "harness.json"
    args = [str(model_dir), "--tasks", MC, "--include-path", str(TASKS), "--limit", "5", "--json", str(out)]
    rc = main(["harness", *args])
    assert rc == 0
    printed = capsys.readouterr().out
    assert MC in printed and "acc_norm" in printed
    r = json.loads(out.read_text())
    t = r["tasks"][MC]
    assert (r["kind"], r["limit"], t["n_samples"], t["n_documents"]) == ("lm-eval-harness", 5, 5, 24)
    assert "documents" not in t and set(t["metrics"]) == {"acc", "acc_norm"}
    card = str(build_card(out.parent, "me/tiny"))
    assert "### lm-evaluation-harness" in card and f"| model | torch | `{MC}` | acc |" in card


def test_api_is_callable_under_both_names():
    import llmopt.harness as package

    assert callable(llmopt.harness) and callable(package) and package.harness.__module__ == "llmopt.harness.run"
    with pytest.raises(LLMOptError, match="--tasks is empty"):
        llmopt.harness("bundled:smollm2", " , ")


@pytest.mark.parametrize(
    "args, message",
    [
        (["MODEL", "--tasks", "no_such_task_xyz", "--include-path", "TASKS"], "unknown task 'no_such_task_xyz'"),
        (["MODEL", "--tasks", MC, "--include-path", "MISSING"], "--include-path"),
        (["NOTMODEL", "--tasks", MC, "--include-path", "TASKS"], "not a .gguf"),
        (["MODEL", "--tasks", "arc_easy"], "--include-path DIR with task YAMLs over local data"),
        (["MODEL", "--tasks", MC, "--include-path", "TASKS", "--limit", "0"], "--limit must be > 0"),
        (["MODEL", "--tasks", MC, "--include-path", "TASKS", "--kv-cache", "f32"], "is a llama.cpp option"),
    ],
    ids=["unknown-task", "missing-include-path", "not-a-model", "hub-task-offline", "bad-limit", "kv-cache-torch"],
)
def test_cli_errors_are_one_line(args, message, model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notmodel = tmp_path / "notes.txt"
    notmodel.write_text("not a model")
    subst = {"MODEL": str(model_dir), "TASKS": str(TASKS), "MISSING": str(tmp_path / "nope"), "NOTMODEL": str(notmodel)}
    rc = main(["harness", *[subst.get(a, a) for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and message in err[-1], err


def test_cli_subprocess_error_exit_code(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "llmopt.cli", "harness", str(tmp_path / "nope"), "--tasks", MC],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"error: no such file or folder: {tmp_path / 'nope'}"]
