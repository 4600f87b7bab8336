"""Fixtures and checks for the bad-input campaign (tests/test_bad_inputs.py).

The world: a tiny Llama (hidden 64, 2 layers, initialised like a real config, std 0.02) with its own BPE
tokenizer, variants of it with one thing broken, recipes, a text file, a small-vocabulary model, and a
larger model (for interrupting a run while it writes). Every case is run through ``llmopt.cli.main``
(in-process, stderr captured at the file-descriptor level, Python warnings counted as stderr lines) or
through ``python -m llmopt.cli`` for the interruptions and a representative subset.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.conftest import REPO, make_tiny_tokenizer, synthetic_text

QUIET_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def make_model(folder: Path, tokenizer, hidden: int = 64, layers: int = 2, vocab: int | None = None) -> Path:
    """A Llama initialised like a real config (transformers' init, std 0.02), saved with ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.02,
    )
    LlamaForCausalLM(cfg).eval().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass
class World:
    root: Path
    model: Path
    small: Path  # vocabulary 300 (the main tokenizer has 320)
    big: Path  # ~40 MB of float32 weights: writing it takes long enough to be interrupted
    text: Path
    mag: Path  # data-free recipe
    rtn: Path  # data-free quantization (stored codes)
    sgpt: Path  # data-driven recipe, small calibration
    quant: Path  # an llmopt quantized output (quantization.json + .safetensors)


def build_world(root: Path) -> World:
    import llmopt

    text = root / "text.txt"
    text.write_text(synthetic_text(4000))
    tok = make_tiny_tokenizer(text.read_text())
    model = make_model(root / "model", tok)
    small = root / "small"
    small_tok = _retrained(text.read_text(), 300)
    make_model(small, small_tok)
    big = make_model(root / "big", tok, hidden=512, layers=4)
    recipes = {
        "mag": "stages:\n  - stage: magnitude\n    sparsity: 0.5\n",
        "rtn": "stages:\n  - stage: rtn\n    format: q4_0\n",
        "sgpt": f"calibration: {{data: 'text:{text}', samples: 2, seq_len: 16}}\nstages:\n  - stage: sparsegpt\n"
        "    sparsity: 0.5\n",
    }
    paths = {}
    for name, body in recipes.items():
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(body)
    quant = root / "quant"
    llmopt.compress(str(model), str(paths["rtn"]), str(quant))
    return World(root, model, small, big, text, paths["mag"], paths["rtn"], paths["sgpt"], quant)


def _retrained(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# ------------------------------------------------------------------------------------------------
# Mutations


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    raw = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    path.write_text(json.dumps(raw))


def weights(folder: Path) -> Path:
    return folder / "model.safetensors"


def rewrite_tensors(folder: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights(folder)))
    save_file(fn(tensors), str(weights(folder)), metadata={"format": "pt"})


def data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def flip(path: Path, offset: int, value: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(value)] = value
    path.write_bytes(bytes(raw))


def gguf_without_vocab(path: Path) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@contextlib.contextmanager
def unwritable(folder: Path):
    """``folder`` made unwritable: immutable (chattr +i) as root, read-only (chmod 555) otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    root = os.geteuid() == 0
    if root:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
            import pytest

            pytest.skip("running as root without chattr: no way to make a folder unwritable")
    else:
        folder.chmod(0o555)
    try:
        yield folder
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)])
        else:
            folder.chmod(0o755)


# ------------------------------------------------------------------------------------------------
# Running and checking


def run_inprocess(argv: list[str], capfd) -> tuple[int, str, list[str]]:
    """``llmopt.cli.main(argv)``: exit code, stdout, stderr lines (Python warnings included)."""
    from llmopt import cli

    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = e.code
    out, err = capfd.readouterr()
    lines = [x for x in err.splitlines() if x.strip()]
    lines += [f"warning: {w.message}" for w in caught if not issubclass(w.category, QUIET_WARNINGS)]
    return int(rc), out, lines


def run_subprocess(argv: list[str], env: dict | None = None, timeout: float = 300) -> tuple[int, str, list[str]]:
    p = subprocess.run(
        [sys.executable, "-m", "llmopt.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    return p.returncode, p.stdout, [x for x in p.stderr.splitlines() if x.strip()]


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every byte of a file or folder (None when absent)."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def temp_siblings(output: Path) -> list[Path]:
    parent = output.parent
    if not parent.is_dir():
        return []
    return [p for p in parent.iterdir() if p.name.startswith(f".{output.name}.") or ".tmp-" in p.name]


def check_failure(
    rc: int, lines: list[str], *, expect: str = "", argparse: bool = False, code: int | tuple[int, ...] = 2
) -> None:
    text = "\n".join(lines)
    assert rc in (code if isinstance(code, tuple) else (code,)), f"exit code {rc}, want {code}:\n{text}"
    assert lines, "no error message"
    assert "Traceback" not in text, text
    if argparse:
        assert lines[-1].startswith("llmopt") and ": error:" in lines[-1], text
    else:
        assert lines[-1].startswith("error:") and len(lines) == 1, text
    assert expect.lower() in lines[-1].lower(), f"{expect!r} not in {lines[-1]!r}"
