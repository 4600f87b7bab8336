"""Named data sets: calibration never reads the evaluation text; c4 follows the GPTQ/SparseGPT protocol
(train shard 0 sampled inside long documents; validation shard 0, first 1100 documents joined with ' ',
256 windows). The Hub loader is replaced by a recorder: no network."""

from __future__ import annotations

import random
import time

import pytest
import torch

import llmopt.data as data_mod
from llmopt.data import (
    C4_CALIB_FILE,
    C4_EVAL_FILE,
    calibration_windows,
    evaluation_tokens,
    load_text,
    sample_document_windows,
)
from llmopt.errors import LLMOptError

PAPER_REQUESTS = {
    "wikitext2": {
        "calib": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", None),
        "eval": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", None),
    },
    "c4": {
        "calib": ("allenai/c4", None, "train", {"train": "en/c4-train.00000-of-01024.json.gz"}),
        "eval": ("allenai/c4", None, "validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"}),
    },
}


class FakeTokenizer:
    """Whitespace tokens that are integers already: 'doc i' holds ids i*1000 .. i*1000+len−1."""

    def __call__(self, text: str, **kw) -> dict:
        return {"input_ids": [int(t) for t in text.split()]}


def fake_documents(lengths: list[int]) -> list[str]:
    return [" ".join(str(i * 1000 + j) for j in range(n)) for i, n in enumerate(lengths)]


@pytest.fixture
def hub_recorder(monkeypatch):
    """Replace datasets.load_dataset; record (name, config, split, data_files) per request."""
    import datasets

    calls: list[tuple] = []
    docs = fake_documents([40 + (7 * i) % 50 for i in range(1200)])

    def fake_load_dataset(name, config=None, *, split=None, data_files=None, **kw):
        calls.append((name, config, split, data_files))
        return datasets.Dataset.from_dict({"text": docs})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data_mod, "_hub_offline", lambda: False)  # conftest sets HF_HUB_OFFLINE
    monkeypatch.setattr(data_mod, "_hub_reachable", lambda: True)  # no probe request from the tests
    return calls, docs


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_calibration_and_evaluation_never_read_the_same_text(hub_recorder, name):
    calls, _ = hub_recorder
    tok = FakeTokenizer()
    calibration_windows(name, tok, n_samples=4, seq_len=16, seed=0)
    calib_calls = list(calls)
    calls.clear()
    evaluation_tokens(name, tok)
    eval_calls = list(calls)
    assert calib_calls == [PAPER_REQUESTS[name]["calib"]]
    assert eval_calls == [PAPER_REQUESTS[name]["eval"]]
    assert calib_calls != eval_calls
    calls.clear()  # load_text resolves the same way for both roles
    load_text(name, role="calib")
    load_text(name, role="eval")
    assert calls == [PAPER_REQUESTS[name]["calib"], PAPER_REQUESTS[name]["eval"]]


def test_c4_shards_are_the_papers():
    assert C4_CALIB_FILE == "en/c4-train.00000-of-01024.json.gz"
    assert C4_EVAL_FILE == "en/c4-validation.00000-of-00008.json.gz"


def test_c4_eval_text_is_first_1100_documents_joined_with_space(hub_recorder):
    _, docs = hub_recorder
    assert load_text("c4", role="eval") == " ".join(docs[:1100])


def test_c4_evaluation_defaults_to_256_windows(hub_recorder, monkeypatch, tiny_model_dir):
    import llmopt.evaluation as ev

    scored: list[tuple[int, int]] = []

    def fake_score(backend, windows, base=None, progress=True):  # the windows' shape is what matters here
        scored.append(tuple(windows.shape))
        return 1.0, windows.shape[0] * (windows.shape[1] - 1), None, 0.0, [1.0] * windows.shape[0]

    monkeypatch.setattr(ev, "score_windows", fake_score)
    d = str(tiny_model_dir)
    ev.evaluate(d, data="c4", seq_len=8, progress=False)
    ev.evaluate(d, data="c4", seq_len=8, max_windows=300, progress=False)
    ev.evaluate(d, data="wikitext2", seq_len=8, progress=False)  # other data sets: every window
    assert scored[:2] == [(256, 8), (300, 8)] and scored[2][0] > 300


def gptq_get_c4_reference(documents: list[str], tok, n: int, seq_len: int, seed: int) -> list[list[int]]:
    """IST-DASLab/gptq datautils.get_c4's calibration loop, verbatim but for the tokenizer call."""
    random.seed(seed)
    out = []
    for _ in range(n):
        while True:
            i = random.randint(0, len(documents) - 1)
            ids = tok(documents[i])["input_ids"]
            if len(ids) > seq_len:
                break
        i = random.randint(0, len(ids) - seq_len - 1)
        out.append(ids[i : i + seq_len])
    return out


def test_c4_sampler_windows_lie_inside_long_documents():
    lengths = [5, 30, 64, 65, 3, 200, 64, 90, 12, 400]
    docs, tok, L = fake_documents(lengths), FakeTokenizer(), 64
    w = sample_document_windows(docs, tok, 40, L, seed=1)
    assert w.shape == (40, L) and w.dtype == torch.long
    for row in w.tolist():
        doc, pos = row[0] // 1000, row[0] % 1000
        assert lengths[doc] > L  # only documents longer than the window (64 tokens exactly is too short)
        assert row == list(range(row[0], row[0] + L)) and pos + L <= lengths[doc] - 1  # contiguous, inside
    assert {r[0] // 1000 for r in w.tolist()} == {3, 5, 7, 9}
    assert w.tolist() == gptq_get_c4_reference(docs, tok, 40, L, seed=1)  # the reference code's draws


def test_c4_sampler_is_deterministic_with_the_seed():
    docs, tok = fake_documents([300, 20, 500, 80, 1000]), FakeTokenizer()
    a = sample_document_windows(docs, tok, 8, 32, seed=3)
    assert torch.equal(a, sample_document_windows(docs, tok, 8, 32, seed=3))
    assert not torch.equal(a, sample_document_windows(docs, tok, 8, 32, seed=4))


def test_c4_sampler_without_long_documents_is_a_one_line_error():
    with pytest.raises(LLMOptError, match="calib-seq-len") as e:
        sample_document_windows(fake_documents([10, 32, 5]), FakeTokenizer(), 4, 32, seed=0)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec", ["wikitext2", "c4", "hf:org/some-set:train"])
def test_offline_hub_data_fails_at_once(monkeypatch, tmp_path, spec):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*a, **kw):
        raise AssertionError("load_dataset must not be called offline without a cache")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    t0 = time.perf_counter()
    for role in ("calib", "eval"):
        with pytest.raises(LLMOptError, match="HF_HUB_OFFLINE") as e:
            load_text(spec, role=role)
        assert "\n" not in str(e.value) and "text:PATH" in str(e.value)
    assert time.perf_counter() - t0 < 5


def test_offline_with_a_cached_dataset_still_loads(monkeypatch, tmp_path, hub_recorder):
    calls, _ = hub_recorder
    monkeypatch.setattr(data_mod, "_hub_offline", lambda: True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    (tmp_path / "Salesforce___wikitext").mkdir()
    assert load_text("wikitext2", role="eval")
    assert calls == [PAPER_REQUESTS["wikitext2"]["eval"]]
