"""Evaluation: GPTQ-protocol perplexity equals a plain model(x, labels=x) loop; KL statistics."""

import json
import math

import pytest
import torch

from llmopt.cli import main
from llmopt.evaluation import evaluate
from llmopt.metrics import make_windows


def reference_ppl(model_dir: str, tokens: torch.Tensor, seq_len: int, n: int) -> float:
    """The reference: HF's own loss on each window, averaged over windows, exp."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    losses = []
    with torch.no_grad():
        for i in range(n):
            x = tokens[i * seq_len : (i + 1) * seq_len][None]
            losses.append(model(x, labels=x).loss.item())
    return math.exp(sum(losses) / len(losses))


def test_make_windows_drops_tail():
    w = make_windows(torch.arange(10), 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert make_windows(torch.arange(10), 3, max_windows=2).shape == (2, 3)


def test_ppl_matches_labels_loop_tiny(tiny_model_dir, tiny_text_file):
    from transformers import AutoTokenizer

    data = f"text:{tiny_text_file}"
    r = evaluate(str(tiny_model_dir), data=data, seq_len=128, max_windows=3, progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokens = torch.tensor(tok(tiny_text_file.read_text(), add_special_tokens=False)["input_ids"])
    ref = reference_ppl(str(tiny_model_dir), tokens, 128, 3)
    assert r.windows == 3 and r.tokens_scored == 3 * 127 and r.seq_len == 128
    assert r.perplexity == pytest.approx(ref, rel=1e-4)


def test_kl_against_itself_is_zero(tiny_model_dir, tiny_text_file):
    r = evaluate(
        str(tiny_model_dir),
        data=f"text:{tiny_text_file}",
        seq_len=64,
        max_windows=2,
        base=str(tiny_model_dir),
        progress=False,
    )
    assert r.kl.mean == pytest.approx(0.0, abs=1e-6) and r.kl.max < 1e-5
    assert r.kl.top1_agreement == 1.0 and r.kl.ppl_ratio == pytest.approx(1.0, abs=1e-6)


class _FixedLogits:
    """A backend whose logits are given per window (by the window's first token)."""

    def __init__(self, table: dict[int, torch.Tensor]):
        self.table = table

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[int(ids[0])]


def test_uncertainties_are_per_token_standard_errors():
    from llmopt.metrics import score_windows

    g = torch.Generator().manual_seed(0)
    windows = torch.tensor([[0, 3, 1, 4, 1, 5], [1, 2, 6, 5, 3, 5]])
    model = _FixedLogits({int(w[0]): torch.randn(6, 8, generator=g) for w in windows})
    base = _FixedLogits({int(w[0]): torch.randn(6, 8, generator=g) for w in windows})
    s = score_windows(model, windows, base=base, progress=False)

    def token_nll(be):  # the same numbers, computed the plain way
        return torch.cat(
            [-torch.log_softmax(be.logits(w)[:-1].double(), -1).gather(1, w[1:, None]).squeeze(1) for w in windows]
        )

    nll, bnll = token_nll(model), token_nll(base)
    n = nll.numel()
    assert s.tokens == n == 10 and s.nll == pytest.approx(float(nll.mean()), rel=1e-6)
    assert s.window_nll == pytest.approx([float(nll[:5].mean()), float(nll[5:].mean())], rel=1e-6)
    assert s.nll_stderr == pytest.approx(float(nll.std() / math.sqrt(n)), rel=1e-5)
    d = nll - bnll  # paired: the same tokens under both models
    assert s.kl["ln_ppl_ratio_stderr"] == pytest.approx(float(d.std() / math.sqrt(n)), rel=1e-5)
    assert math.log(s.kl["ppl_ratio"]) == pytest.approx(float(d.mean()), rel=1e-5)
    # against itself: no difference at all, so no uncertainty in the ratio
    same = score_windows(model, windows, base=model, progress=False)
    assert same.kl["ln_ppl_ratio_stderr"] == 0.0 and same.kl["mean_stderr"] < 1e-6


def test_cli_json_and_speed(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(
        [
            "eval",
            str(tiny_model_dir),
            "--data",
            f"text:{tiny_text_file}",
            "--seq-len",
            "64",
            "--max-windows",
            "2",
            "--base",
            str(tiny_model_dir),
            "--speed",
            "--threads",
            "1",
            "--repeats",
            "2",
            "--json",
            str(out),
            "-q",
        ]
    )
    assert rc == 0
    d = json.loads(out.read_text())
    for k in ("perplexity", "windows", "seq_len", "tokens_scored", "backend", "model"):
        assert k in d
    assert set(d["kl"]) >= {"mean", "median", "p99", "max", "top1_agreement"}
    sp = d["speed"]
    assert set(sp) >= {"prefill_tok_s", "decode_tok_s", "threads", "repeats", "dtype"}
    assert sp["threads"] == 1 and sp["prefill_tok_s"] > 0 and sp["decode_tok_s"] > 0
    assert (sp["repeats"], sp["dtype"], sp["prompt_tokens"], sp["new_tokens"]) == (2, "float32", 512, 128)
    for k in ("prefill_tok_s", "decode_tok_s"):  # median with its spread over the repeats
        assert sp[k + "_min"] <= sp[k] <= sp[k + "_max"]
    out = capsys.readouterr().out
    assert "perplexity" in out and "median of 2" in out and "float32" in out


@pytest.mark.integration
def test_bundled_ppl_matches_labels_loop(wikitext_path):
    """The Done-when check on the real model: llmopt's perplexity == a plain labels loop (±0.1%)."""
    from llmopt.models import load_model

    loaded = load_model("bundled:smollm2")
    data = f"text:{wikitext_path}"
    r = evaluate("bundled:smollm2", data=data, seq_len=256, max_windows=2, progress=False)
    tokens = torch.tensor(loaded.tokenizer(wikitext_path.read_text()[:20000], add_special_tokens=False)["input_ids"])
    losses = []
    with torch.no_grad():
        for i in range(2):
            x = tokens[i * 256 : (i + 1) * 256][None]
            losses.append(loaded.model(x, labels=x).loss.item())
    ref = math.exp(sum(losses) / 2)
    assert r.perplexity == pytest.approx(ref, rel=1e-3)
    assert 5 < r.perplexity < 200  # a trained model on English text, not a random one
