"""Tiny random causal LMs of every architecture llmopt supports, built offline from transformers configs.

Each is a few hundred KB and builds in well under a second. Weights are re-initialised so that the
models make sharp, non-uniform predictions (KL and logit comparisons between a model and its
compressed or exported copy then say something): Linear weights N(0, 0.15²), embeddings N(0, 0.5²)
(tied embeddings of N(0, 1) give perplexities near 1e11, see the developers' guide), norms at their
config's identity value.

The configs exercise the layouts the engine and exporters must handle: fused q/k/v and gate/up
(phi3), transposed ``Conv1D`` weights (gpt2), a decoder under ``model.decoder`` with biases and
learned positions (opt), per-head q/k norms (qwen3), and layers that mix sliding-window and full
attention (gemma2, gemma3, qwen2 with ``use_sliding_window``) with a window much shorter than the
calibration windows, so a mask captured once at layer 0 would be wrong for some layers.
"""

from __future__ import annotations

import torch

HIDDEN = 64
LAYERS = 3
WINDOW = 8  # sliding window of the models that have one (shorter than any test window)

#: HF model_type of every architecture in the test matrix
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt2", "opt")


def tiny_config(arch: str, vocab_size: int, sliding: bool = True):
    """A transformers config of ``arch`` with hidden 64, 3 layers, 4 heads (2 KV heads where GQA exists).

    ``sliding=False`` drops the optional sliding window of mistral and qwen2 (real Mistral v0.2+ and
    Qwen2.5 checkpoints have none; llama.cpp ignores it for those architectures). Gemma 2/3 always
    keep theirs: it is part of the architecture and llama.cpp implements it.
    """
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    llama_like = dict(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **common,
    )
    if arch == "llama":
        return tf.LlamaConfig(**llama_like)
    if arch == "mistral":
        return tf.MistralConfig(sliding_window=WINDOW if sliding else None, **llama_like)
    if arch == "qwen2":
        # layers >= max_window_layers use the sliding window: layer 0 full, layers 1-2 sliding
        return tf.Qwen2Config(use_sliding_window=sliding, sliding_window=WINDOW, max_window_layers=1, **llama_like)
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=16, **llama_like)
    if arch == "phi3":
        return tf.Phi3Config(pad_token_id=0, **llama_like)
    if arch == "gemma2":
        return tf.Gemma2Config(head_dim=16, sliding_window=WINDOW, pad_token_id=0, **llama_like)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2, pad_token_id=0, **llama_like
        )
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=512, **common)
    if arch == "opt":
        return tf.OPTConfig(
            hidden_size=HIDDEN,
            ffn_dim=2 * HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            word_embed_proj_dim=HIDDEN,
            max_position_embeddings=512,
            pad_token_id=0,
            **common,
        )
    raise ValueError(f"unknown test architecture {arch}; known: {', '.join(ARCHS)}")


def make_tiny_model(arch: str, vocab_size: int, seed: int = 0, sliding: bool = True):
    """A random eval-mode causal LM of ``arch`` (float32) with sharp predictions."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size, sliding)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5 if ("embed" in name or "wte" in name or "wpe" in name) else 0.15)
            elif "bias" in name:
                p.normal_(0, 0.02)
    return model


def save_tiny_model(arch: str, folder, tokenizer, seed: int = 0, sliding: bool = True):
    """Save a tiny ``arch`` model and ``tokenizer`` as an HF folder (safetensors); returns the model."""
    model = make_tiny_model(arch, len(tokenizer), seed, sliding)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return model
