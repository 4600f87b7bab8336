"""The streaming safetensors writer: files that safetensors itself reads back bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llmopt.safetensors_io import write_safetensors


def test_streamed_file_reads_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.codes": torch.randint(0, 16, (7, 64), dtype=torch.uint8, generator=g),
        "a.scale": torch.randn(7, 2, generator=g),
        "b.codes": torch.randint(-128, 127, (3, 5), dtype=torch.int8, generator=g),
        "c.bf16": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "d.f16": torch.randn(1, generator=g).to(torch.float16),
        "e.empty": torch.zeros(0, 4),
        "f.i64": torch.arange(5),
        "g.bool": torch.tensor([True, False, True]),
    }
    calls = []

    def make(name):
        def f():
            calls.append(name)
            return tensors[name]

        return f

    path = tmp_path / "x.safetensors"
    write_safetensors(path, [(n, tuple(t.shape), t.dtype, make(n)) for n, t in tensors.items()])
    assert calls == list(tensors)  # each tensor produced once, in order
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and torch.equal(back[n], t), n
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("a.codes"), tensors["a.codes"])


def test_wrong_tensor_is_refused(tmp_path):
    with pytest.raises(ValueError, match="expected"):
        write_safetensors(tmp_path / "x.safetensors", [("a", (2, 2), torch.float32, lambda: torch.zeros(2, 3))])
