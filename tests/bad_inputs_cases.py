"""Cases of the bad-input campaign (tests/test_bad_inputs.py): model folders, data specs, recipes.

Each case is a function (world, tmp_path) → :class:`Case` registered in :data:`CASES` by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.bad_inputs_support import (
    World,
    copy_model,
    data_start,
    edit_json,
    flip,
    gguf_without_vocab,
    rewrite_tensors,
    weights,
)


@dataclass
class Case:
    argv: list
    out: Path | None = None  # the output the command names (must stay absent / identical)
    expect: str = ""  # part of the error line
    rerun: list | None = None  # a good command to the same output, run after the failure
    argparse: bool = False
    pre: bool = False  # the output exists before the run
    cleanup: Callable | None = None


CASES: dict[str, Callable[[World, Path], Case]] = {}


def case(name: str):
    def register(fn):
        assert name not in CASES
        CASES[name] = fn
        return fn

    return register


def compress(w: World, t: Path, model=None, recipe=None, *extra, out=None, expect="", pre=False) -> Case:
    out = out or t / "out"
    good = ["compress", w.model, "--recipe", w.mag, "--output", out] + (["--overwrite"] if pre else [])
    argv = ["compress", model or w.model, "--recipe", recipe or w.mag, "--output", out, *extra]
    return Case(argv, out, expect, good, pre=pre)


def broken(w: World, t: Path, mutate, expect: str, base: Path | None = None) -> Case:
    m = copy_model(base or w.model, t / "broken")
    mutate(m)
    return compress(w, t, m, expect=expect)


# ---------------------------------------------------------------- corrupt or inconsistent model folders
def drop(folder: Path, name: str) -> None:
    rewrite_tensors(folder, lambda t: {k: v for k, v in t.items() if k != name})


def cut(frac):
    return lambda m: weights(m).write_bytes(weights(m).read_bytes()[: int(weights(m).stat().st_size * frac)])


for _name, _mut, _exp in [
    ("safetensors-truncated-half", cut(0.5), "truncated"),
    ("safetensors-truncated-tail", cut(0.999), "truncated"),
    ("safetensors-truncated-header", cut(0.0001), "safetensors"),
    ("safetensors-empty", lambda m: weights(m).write_bytes(b""), "empty"),
    ("safetensors-header-bitflip", lambda m: flip(weights(m), 12, b"\xff"), "safetensors"),
    ("safetensors-length-bitflip", lambda m: flip(weights(m), 7, b"\x40"), "safetensors"),
    ("safetensors-shape-bitflip", lambda m: flip(weights(m), weights(m).read_bytes().index(b'"shape":[') + 9, b"9"),
     "safetensors"),
    ("safetensors-data-bitflip-inf", lambda m: flip(weights(m), data_start(weights(m)) + 4, b"\x00\x00\x80\x7f"),
     "infinite"),
    ("config-hidden-mismatch", lambda m: edit_json(m / "config.json", hidden_size=128), "does not match"),
    ("config-vocab-mismatch", lambda m: edit_json(m / "config.json", vocab_size=400), "does not match"),
    ("config-intermediate-mismatch", lambda m: edit_json(m / "config.json", intermediate_size=96), "does not match"),
    ("config-more-layers", lambda m: edit_json(m / "config.json", num_hidden_layers=3), "lacks"),
    ("config-type-str", lambda m: edit_json(m / "config.json", hidden_size="64"), "positive integer"),
    ("config-type-float", lambda m: edit_json(m / "config.json", num_attention_heads=3.5), "positive integer"),
    ("config-type-bool", lambda m: edit_json(m / "config.json", num_hidden_layers=True), "positive integer"),
    ("config-type-eps", lambda m: edit_json(m / "config.json", rms_norm_eps="small"), "number"),
    ("config-zero-heads", lambda m: edit_json(m / "config.json", num_attention_heads=0), "positive integer"),
    ("config-not-json", lambda m: (m / "config.json").write_text("{model_type: llama"), "not valid JSON"),
    ("config-list", lambda m: (m / "config.json").write_text("[1, 2]"), "not a JSON object"),
    ("config-not-utf8", lambda m: (m / "config.json").write_bytes(b'{"model_type": "ll\xe9ma"}'), "UTF-8"),
    ("config-unknown-model-type", lambda m: edit_json(m / "config.json", model_type="nosucharch"), "config.json"),
    ("config-no-model-type", lambda m: edit_json(m / "config.json", model_type=None, architectures=None),
     "config.json"),
    ("tokenizer-missing", lambda m: [(m / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")],
     "no tokenizer"),
    ("tokenizer-missing-slow-class", lambda m: ((m / "tokenizer.json").rename(m / "vocab.json"),
     edit_json(m / "tokenizer_config.json", tokenizer_class="LlamaTokenizer")), "tokenizer"),
    ("tokenizer-json-truncated", lambda m: (m / "tokenizer.json").write_text((m / "tokenizer.json").read_text()[:500]),
     "not valid JSON"),
    ("tokenizer-json-not-a-tokenizer", lambda m: (m / "tokenizer.json").write_text('{"hello": 1}'), "tokenizer"),
    ("tokenizer-config-corrupt", lambda m: (m / "tokenizer_config.json").write_text("{"), "not valid JSON"),
    ("tokenizer-not-utf8", lambda m: (m / "tokenizer.json").write_bytes(b"\xff\xfe{}"), "UTF-8"),
    ("tensor-missing", lambda m: drop(m, "model.layers.1.mlp.up_proj.weight"), "lacks 1 tensor"),
    ("tensor-missing-norm", lambda m: drop(m, "model.norm.weight"), "random values"),
    ("tensor-transposed", lambda m: rewrite_tensors(m, lambda t: {k: (v.t().contiguous() if "up_proj" in k else v)
     for k, v in t.items()}), "does not match"),
    ("no-safetensors", lambda m: weights(m).unlink(), "no *.safetensors"),
    ("pytorch-bin-only", lambda m: weights(m).rename(m / "pytorch_model.bin"), "pytorch_model.bin"),
    ("shard-index-missing-shard", lambda m: (m / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})), "lacks shard"),
    ("shard-index-corrupt", lambda m: (m / "model.safetensors.index.json").write_text("{"), "not valid JSON"),
    ("no-config", lambda m: (m / "config.json").unlink(), "no config.json"),
    ("generation-config-truncated", lambda m: (m / "generation_config.json").write_text('{"bos_token_id": 1, "eos'),
     "generation_config.json is not valid JSON"),
    ("generation-config-list", lambda m: (m / "generation_config.json").write_text("[1, 2]"),
     "generation_config.json is not a JSON object"),
    ("generation-config-bad-temperature", lambda m: edit_json(m / "generation_config.json", do_sample=True,
     temperature=-1.0), "generation_config.json: 'temperature' is -1.0"),
    ("generation-config-unsaveable", lambda m: edit_json(m / "generation_config.json", do_sample=False,
     temperature=0.6), "generation_config.json is invalid (- `temperature`"),
]:  # fmt: skip
    case(_name)(lambda w, t, _m=_mut, _e=_exp: broken(w, t, _m, _e))


@case("tokenizer-larger-than-embedding")
def _(w, t):
    def mutate(m):
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (w.model / f).is_file():
                shutil.copy(w.model / f, m / f)

    return broken(w, t, mutate, "embedding", base=w.small)


@case("model-nonexistent")
def _(w, t):
    return compress(w, t, t / "nope", expect="no such file")


@case("model-plain-file")
def _(w, t):
    (t / "notes.txt").write_text("hello")
    return compress(w, t, t / "notes.txt", expect="not a .gguf")


@case("gguf-no-vocabulary")
def _(w, t):
    return compress(w, t, gguf_without_vocab(t / "novocab.gguf"), expect="no vocabulary")


@case("gguf-truncated")
def _(w, t):
    g = gguf_without_vocab(t / "cut.gguf")
    g.write_bytes(g.read_bytes()[:-100])
    return compress(w, t, g, expect="not a valid GGUF")


@case("gguf-empty")
def _(w, t):
    (t / "e.gguf").write_bytes(b"")
    return compress(w, t, t / "e.gguf", expect="empty")


@case("gguf-garbage")
def _(w, t):
    (t / "g.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    return compress(w, t, t / "g.gguf", expect="not a valid GGUF")


@case("bundled-unknown")
def _(w, t):
    return compress(w, t, "bundled:nope", expect="unknown bundled model")


@case("model-empty-spec")
def _(w, t):
    return compress(w, t, " ", expect="empty model spec")


@case("hub-id-offline")
def _(w, t):
    return compress(w, t, "nobody-xyz/no-such-model", expect="not found")


@case("hub-id-invalid")
def _(w, t):
    return compress(w, t, "a b/c d", expect="not a local file")


# ---------------------------------------------------------------- data specs
def calib(w, t, spec, *extra, expect=""):
    return compress(w, t, None, w.sgpt, "--calib", spec, *extra, expect=expect)


def _latin1(t: Path) -> Path:
    p = t / "latin1.txt"
    p.write_bytes(("caf\xe9 na\xefve " * 200).encode("latin-1"))
    return p


case("calib-not-utf8")(lambda w, t: calib(w, t, f"text:{_latin1(t)}", expect="not UTF-8"))
case("calib-missing-file")(lambda w, t: calib(w, t, f"text:{t}/nope.txt", expect="not found"))
case("calib-directory")(lambda w, t: calib(w, t, f"text:{t}", expect="folder"))
case("calib-empty-file")(lambda w, t: ((t / "e.txt").write_text(""), calib(w, t, f"text:{t}/e.txt", expect="empty"))[1])
case("calib-bad-fraction")(lambda w, t: calib(w, t, f"text:{w.text}#0.5:0.2", expect="bad fraction"))
case("calib-fraction-words")(lambda w, t: calib(w, t, f"text:{w.text}#a:b", expect="bad fraction"))
case("calib-text-too-short")(lambda w, t: calib(w, t, f"text:{w.text}#0:0.001", "--calib-seq-len", "500",
                                                expect="fewer than one window"))  # fmt: skip
case("calib-self-zero")(lambda w, t: calib(w, t, "self:0", expect="self:N"))
case("calib-self-words")(lambda w, t: calib(w, t, "self:many", expect="self:N"))
case("calib-unknown-spec")(lambda w, t: calib(w, t, "wikipedia", expect="unknown data spec"))
case("calib-hf-malformed")(lambda w, t: calib(w, t, "hf:a:b:c:d:e", expect="cannot parse"))
case("calib-hf-offline")(lambda w, t: calib(w, t, "hf:nobody-xyz/nothing:train", expect="HF_HUB_OFFLINE"))
case("calib-wikitext2-offline")(lambda w, t: calib(w, t, "wikitext2", expect="text:PATH"))
case("calib-c4-offline")(lambda w, t: calib(w, t, "c4", expect="text:PATH"))


def _fifo(t: Path, c_fn) -> Case:
    """A named pipe with no writer as the text file. A guard unblocks a reader that opens it anyway after 60 s
    (end of file: an "empty" error instead of the expected one), so a regression fails instead of hanging."""
    fifo = t / "pipe.txt"
    os.mkfifo(fifo)

    def unblock():
        with contextlib.suppress(OSError):  # ENXIO: nobody is reading, nothing to unblock
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    guard = threading.Timer(60, unblock)
    guard.daemon = True
    guard.start()
    c = c_fn(f"text:{fifo}")
    c.cleanup = lambda: (guard.cancel(), unblock())
    return c


case("calib-fifo")(lambda w, t: _fifo(t, lambda spec: calib(w, t, spec, expect="named pipe (FIFO), not a regular")))
case("eval-data-fifo")(
    lambda w, t: _fifo(t, lambda spec: evaluate(w, t, "--data", spec, expect="named pipe (FIFO), not a regular"))
)
case("calib-broken-symlink")(
    lambda w, t: ((t / "l.txt").symlink_to(t / "gone"), calib(w, t, f"text:{t}/l.txt", expect="not found"))[1]
)


def evaluate(w, t, *extra, model=None, json_out=None, expect=""):
    out = json_out or t / "r.json"
    good = ["eval", w.model, "--data", f"text:{w.text}", "--seq-len", "32", "--max-windows", "2", "-q", "--json", out]
    argv = ["eval", model or w.model, "--data", f"text:{w.text}", "--seq-len", "32", "--max-windows", "2", "-q"]
    argv += [*extra, "--json", out]
    return Case(argv, out, expect, good)


case("eval-data-not-utf8")(lambda w, t: evaluate(w, t, "--data", f"text:{_latin1(t)}", expect="not UTF-8"))
case("eval-data-self")(lambda w, t: evaluate(w, t, "--data", "self:4", expect="cannot be used for evaluation"))
case("eval-data-too-short")(lambda w, t: evaluate(w, t, "--seq-len", "100000", expect="fewer than one window"))
case("eval-data-offline")(lambda w, t: evaluate(w, t, "--data", "wikitext2", expect="HF_HUB_OFFLINE"))

# ---------------------------------------------------------------- recipes
_RECIPES = {
    "recipe-not-utf8": (b"stages:\n  - stage: magnitude  # caf\xe9\n", "not UTF-8"),
    "recipe-invalid-yaml": (b"stages: [\n", "not valid YAML"),
    "recipe-list": (b"- stage: magnitude\n", "YAML mapping"),
    "recipe-empty": (b"", "YAML mapping"),
    "recipe-unknown-key": (b"stages:\n  - stage: magnitude\n    sparsityy: 0.5\n", "unknown key 'sparsityy'"),
    "recipe-unknown-stage": (b"stages:\n  - stage: prune\n", "unknown stage"),
    "recipe-samples-zero": (b"calibration: {samples: 0}\nstages:\n  - stage: magnitude\n", "calibration.samples"),
    "recipe-seq-len-one": (b"calibration: {seq_len: 1}\nstages:\n  - stage: magnitude\n", "calibration.seq_len"),
    "recipe-seed-huge": (b"calibration: {seed: 99999999999999999999999}\nstages:\n  - stage: magnitude\n", "seed"),
    "recipe-seed-negative": (b"calibration: {seed: -1}\nstages:\n  - stage: magnitude\n", "seed"),
    "recipe-bits-word": (b"stages:\n  - stage: rtn\n    format: int\n    bits: four\n", "bits"),
    "recipe-no-stages": (b"stages: []\n", "stages"),
    "recipe-group-size": (b"stages:\n  - stage: rtn\n    format: int\n    bits: 4\n    group_size: 48\n", "group size"),
    "recipe-sparsity-high": (b"stages:\n  - stage: magnitude\n    sparsity: 1.5\n", "sparsity"),
    "recipe-calib-data-bad": (b"calibration: {data: 'foo'}\nstages:\n  - stage: magnitude\n", "unknown data spec"),
    "recipe-eval-unknown-key": (b"evaluation: {windowz: 2}\nstages:\n  - stage: magnitude\n", "valid keys: data"),
    "recipe-eval-data-bad": (b"evaluation: {data: 'foo'}\nstages:\n  - stage: magnitude\n", "unknown data spec"),
    "recipe-structured-heads": (
        b"calibration: {data: 'self:2'}\nstages:\n  - stage: structured\n    num_attention_heads: 3\n",
        "multiple of",
    ),
    "recipe-structured-too-wide": (
        b"calibration: {data: 'self:2'}\nstages:\n  - stage: structured\n    hidden_size: 4096\n",
        "larger than",
    ),
    "recipe-structured-after-quant": (
        b"stages:\n  - stage: rtn\n    format: q8_0\n  - stage: structured\n    num_layers: 1\n",
        "must come before",
    ),
}
for _name, (_body, _exp) in _RECIPES.items():
    case(_name)(
        lambda w, t, _b=_body, _e=_exp: ((t / "r.yaml").write_bytes(_b), compress(w, t, None, t / "r.yaml", expect=_e))[
            1
        ]
    )
case("recipe-missing")(lambda w, t: compress(w, t, None, t / "nope.yaml", expect="recipe not found"))
case("recipe-directory")(lambda w, t: ((t / "d.yaml").mkdir(), compress(w, t, None, t / "d.yaml", expect="recipe"))[1])
