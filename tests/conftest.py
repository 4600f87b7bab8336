"""Shared fixtures: a tiny random Llama with its own small BPE tokenizer (seconds, fully offline), and
the bundled SmolLM2-135M + WikiText-2 text for the few integration tests."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.nounk.txt"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
torch.set_num_threads(min(2, os.cpu_count() or 1))

WORDS = (
    "the of and to in a is was for on as with by he at from his it an were are which this also be had or "
    "first new after its their two one has but not they her she time city year river team game song film "
    "album war school church station house world album season 1990 2004 17 3.5 , . ; ( ) @-@ = "
).split()


def synthetic_text(n_words: int = 12000, seed: int = 0) -> str:
    """Deterministic pseudo-English with paragraph breaks (for the tiny model's tokenizer and data)."""
    rng = random.Random(seed)
    lines, line = [], []
    for i in range(n_words):
        line.append(rng.choice(WORDS))
        if rng.random() < 0.06:
            lines.append(" ".join(line))
            line = []
        if i % 400 == 399:
            lines.append("")
    return "\n".join(lines) + "\n"


def make_tiny_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Default init (std 0.02) gives near-uniform logits; a larger scale gives the random model
    # sharper predictions, so KL and perplexity differences between compressions are measurable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15 if "embed" not in name else 1.0)
    return model


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "tiny.txt"
    p.write_text(synthetic_text())
    return p


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_text_file) -> Path:
    """A saved HF folder (safetensors + tokenizer) of a 2-layer, hidden-64 random Llama."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tiny_tokenizer(tiny_text_file.read_text())
    model = make_tiny_llama(len(tok))
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    if not WIKITEXT.is_file():
        pytest.skip(f"WikiText-2 text not found at {WIKITEXT} (see ../shared/data/README.md)")
    return WIKITEXT
