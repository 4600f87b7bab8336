"""The bad-input campaign: every input a new user can get wrong, and every interruption.

Each case runs the CLI on tiny fixtures and checks the README's promise: exit code 2 (130/143 for
SIGINT/SIGTERM), the last stderr line starts with ``error:`` and is the only one (argparse's own
``llmopt: error:`` comes last after its usage), no traceback, no output and no temp sibling left, a
pre-existing output byte-identical, and a rerun to the same output works. Most cases run in-process
through ``llmopt.cli.main``; interruptions and a representative subset run ``python -m llmopt.cli``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bad_inputs_cases import CASES, Case, broken, case, compress, cut, evaluate
from tests.bad_inputs_support import (
    World,
    build_world,
    check_failure,
    copy_model,
    gguf_without_vocab,
    run_inprocess,
    run_subprocess,
    snapshot,
    temp_siblings,
    unwritable,
)
from tests.conftest import REPO


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))


# ---------------------------------------------------------------- CLI arguments
for _name, _extra, _exp in [
    ("cli-calib-samples-zero", ["--calib-samples", "0"], "--calib-samples"),
    ("cli-calib-samples-negative", ["--calib-samples", "-3"], "--calib-samples"),
    ("cli-calib-seq-len-one", ["--calib-seq-len", "1"], "--calib-seq-len"),
    ("cli-seed-huge", ["--seed", str(2**70)], "--seed"),
    ("cli-seed-negative", ["--seed", "-1"], "--seed"),
    ("cli-device-bogus", ["--device", "toaster"], "invalid device"),
]:
    case(_name)(lambda w, t, _x=_extra, _e=_exp: compress(w, t, None, w.sgpt, *_x, expect=_e))
for _name, _extra, _exp in [
    ("cli-eval-threads-zero", ["--threads", "0"], "--threads"),
    ("cli-eval-threads-negative", ["--threads", "-2"], "--threads"),
    ("cli-eval-seq-len-one", ["--seq-len", "1"], "--seq-len"),
    ("cli-eval-max-windows-zero", ["--max-windows", "0"], "--max-windows"),
    ("cli-eval-repeats-zero", ["--speed", "--repeats", "0"], "--repeats"),
    ("cli-eval-backend-bogus", ["--backend", "tpu"], "unknown backend"),
]:
    case(_name)(lambda w, t, _x=_extra, _e=_exp: evaluate(w, t, *_x, expect=_e))
for _name, _argv in [
    ("argparse-missing-recipe", ["compress", "m", "--output", "o"]),
    ("argparse-unknown-flag", ["compress", "m", "--recipe", "r", "--output", "o", "--frobnicate"]),
    ("argparse-samples-word", ["compress", "m", "--recipe", "r", "--output", "o", "--calib-samples", "abc"]),
    ("argparse-dtype-bogus", ["compress", "m", "--recipe", "r", "--output", "o", "--dtype", "int3"]),
    ("argparse-no-command", []),
    ("argparse-export-to-bogus", ["export", "m", "--to", "tflite", "--output", "o"]),
]:
    case(_name)(lambda w, t, _a=_argv: Case(_a, argparse=True))


# ---------------------------------------------------------------- output paths
def export(w, t, *extra, model=None, out=None, expect="", pre=False):
    out = out or t / "m.gguf"
    good = ["export", w.model, "--type", "f32", "--output", out] + (["--overwrite"] if pre else [])
    return Case(["export", model or w.model, "--output", out, *extra], out, expect, good, pre=pre)


@case("output-unwritable-dir")
def _(w, t):
    cm = unwritable(t / "ro")
    cm.__enter__()
    c = compress(w, t, out=t / "ro" / "out", expect="not writable")
    c.cleanup, c.rerun = lambda: cm.__exit__(None, None, None), None
    return c


@case("output-unwritable-parent-missing")
def _(w, t):
    cm = unwritable(t / "ro")
    cm.__enter__()
    c = compress(w, t, out=t / "ro" / "a" / "b" / "out", expect="not writable")
    c.cleanup, c.rerun = lambda: cm.__exit__(None, None, None), None
    return c


@case("json-unwritable-dir")
def _(w, t):
    cm = unwritable(t / "ro")
    cm.__enter__()
    c = evaluate(w, t, json_out=t / "ro" / "r.json", expect="not writable")
    c.cleanup, c.rerun = lambda: cm.__exit__(None, None, None), None
    return c


def _file(t: Path) -> Path:
    (t / "f").write_text("a file")
    return t / "f"


case("output-parent-is-file")(lambda w, t: no_rerun(compress(w, t, out=_file(t) / "out", expect="is a file")))
case("output-grandparent-is-file")(
    lambda w, t: no_rerun(compress(w, t, out=_file(t) / "x" / "out", expect="is a file"))
)


def no_rerun(c: Case, out: Path | None | bool = False) -> Case:
    c.rerun = None
    if out is not False:
        c.out = out
    return c


case("output-dot")(
    lambda w, t: no_rerun(compress(w, t, None, None, "--overwrite", out=Path("."), expect="current folder"), None)
)
case("output-dotdot")(
    lambda w, t: no_rerun(compress(w, t, None, None, "--overwrite", out=Path(".."), expect="current folder"), None)
)
case("output-empty")(lambda w, t: Case(["compress", w.model, "--recipe", w.mag, "--output", ""], expect="empty"))
case("output-is-file")(
    lambda w, t: no_rerun(compress(w, t, None, None, "--overwrite", out=_file(t), expect="is a file"))
)


@case("output-exists")
def _(w, t):
    (t / "out").mkdir()
    (t / "out" / "keep.txt").write_text("user data")
    return compress(w, t, expect="already exists", pre=True)


@case("output-exists-overwrite-bad-model")
def _(w, t):
    (t / "out").mkdir()
    (t / "out" / "keep.txt").write_text("user data")
    c = compress(w, t, t / "nope", None, "--overwrite", expect="no such file", pre=True)
    return c


@case("output-exists-overwrite-bad-recipe")
def _(w, t):
    shutil.copytree(w.quant, t / "out")
    (t / "r.yaml").write_text("stages:\n  - stage: rtn\n    format: int\n    bits: 4\n    group_size: 48\n")
    return compress(w, t, None, t / "r.yaml", "--overwrite", expect="group size", pre=True)


case("json-onto-directory")(
    lambda w, t: ((t / "j").mkdir(), no_rerun(evaluate(w, t, json_out=t / "j", expect="folder")))[1]
)
case("json-parent-is-file")(lambda w, t: no_rerun(evaluate(w, t, json_out=_file(t) / "r.json", expect="is a file")))
case("export-parent-is-file")(
    lambda w, t: no_rerun(export(w, t, "--type", "f32", out=_file(t) / "m.gguf", expect="is a file"))
)
case("export-not-gguf-name")(
    lambda w, t: no_rerun(export(w, t, "--type", "f32", out=t / "m.bin", expect="must end in .gguf"))
)
case("export-onto-directory")(
    lambda w, t: ((t / "d.gguf").mkdir(), no_rerun(export(w, t, out=t / "d.gguf", expect="folder")))[1]
)
case("export-onnx-dot")(lambda w, t: Case(["export", w.model, "--to", "onnx", "--output", ".", "--overwrite"],
                                          expect="current folder"))  # fmt: skip
case("export-onnx-onto-file")(lambda w, t: Case(["export", w.model, "--to", "onnx", "--output", _file(t)],
                                                _file(t), "is a file"))  # fmt: skip


@case("export-exists")
def _(w, t):
    (t / "m.gguf").write_bytes(b"GGUF user file")
    return export(w, t, "--type", "f32", expect="already exists", pre=True)


@case("export-exists-overwrite-bad-imatrix")
def _(w, t):
    (t / "m.gguf").write_bytes(b"GGUF user file")
    (t / "im.dat").write_bytes(b"\x07\x00\x00\x00garbage")
    return export(w, t, "--type", "q4_k_m", "--imatrix", t / "im.dat", "--overwrite", expect="imatrix", pre=True)


# ---------------------------------------------------------------- export inputs
def quant_copy(w, t, mutate) -> Path:
    q = copy_model(w.quant, t / "q")
    mutate(q)
    return q


for _name, _mut, _exp in [
    ("quant-json-corrupt", lambda q: (q / "quantization.json").write_text("{oops"), "not valid JSON"),
    ("quant-json-list", lambda q: (q / "quantization.json").write_text("[]"), "not a JSON object"),
    ("quant-json-entry-missing-format", lambda q: (q / "quantization.json").write_text(
        json.dumps({k: {**v, "format": None} for k, v in json.loads((q / "quantization.json").read_text()).items()})),
     "malformed"),
    ("quant-json-format-unknown", lambda q: (q / "quantization.json").write_text(
        json.dumps({k: {**v, "format": "q9_9"} for k, v in json.loads((q / "quantization.json").read_text()).items()})),
     "unknown quantization format"),
    ("quant-codes-missing", lambda q: (q / "quantization.safetensors").unlink(), "no quantization.safetensors"),
    ("quant-codes-truncated", lambda q: (q / "quantization.safetensors").write_bytes(
        (q / "quantization.safetensors").read_bytes()[:-50]), "truncated"),
    ("quant-codes-empty", lambda q: (q / "quantization.safetensors").write_bytes(b""), "empty"),
]:  # fmt: skip
    case(_name)(lambda w, t, _m=_mut, _e=_exp: export(w, t, "--type", "auto", model=quant_copy(w, t, _m), expect=_e))
    case("onnx-" + _name)(
        lambda w, t, _m=_mut, _e=_exp: Case(
            ["export", quant_copy(w, t, _m), "--to", "onnx", "--quant", "auto", "--output", t / "onnx"], t / "onnx", _e
        )
    )


def _imatrix(t: Path, data: bytes) -> Path:
    (t / "im.dat").write_bytes(data)
    return t / "im.dat"


for _name, _data, _exp in [
    ("imatrix-garbage", bytes(range(256)) * 3, "imatrix"),
    ("imatrix-empty", b"", "imatrix"),
    ("imatrix-gguf-truncated", b"GGUF\x03\x00\x00\x00" + b"\x00" * 9, "imatrix"),
    ("imatrix-wrong-model", b"\x01\x00\x00\x00\x05\x00\x00\x00blk.9\x01\x00\x00\x00\x02\x00\x00\x00" + b"\x00" * 8,
     "imatrix"),
]:  # fmt: skip
    case(_name)(
        lambda w, t, _d=_data, _e=_exp: export(w, t, "--type", "q4_k_m", "--imatrix", _imatrix(t, _d), expect=_e)
    )
for _name, _extra, _exp in [
    ("export-type-bogus", ["--type", "q3_z"], "unknown --type"),
    ("export-embedding-type-bogus", ["--type", "f16", "--embedding-type", "q3_z"], "--embedding-type"),
    ("export-imatrix-plain-type", ["--type", "f16", "--imatrix", "self:2"], "--imatrix only applies"),
    ("export-needs-imatrix", ["--type", "iq2_xxs"], "importance matrix"),
    ("export-gguf-onnx-flag", ["--quant", "int8-dynamic"], "ONNX options"),
    ("export-onnx-gguf-flag", ["--to", "onnx", "--type", "q4_0"], "GGUF options"),
    ("export-onnx-block-size", ["--to", "onnx", "--quant", "int4-rtn", "--block-size", "17"], "power of two"),
    ("export-onnx-auto-unquantized", ["--to", "onnx", "--quant", "auto"], "no quantization.json"),
]:
    case(_name)(lambda w, t, _x=_extra, _e=_exp: export(w, t, *_x, expect=_e))
case("export-broken-model")(lambda w, t: export(w, t, "--type", "f32", model=broken(w, t, cut(0.5), "").argv[1],
                                                expect="truncated"))  # fmt: skip
case("export-gguf-no-vocab")(lambda w, t: export(w, t, "--type", "f32", model=gguf_without_vocab(t / "nv.gguf"),
                                                 expect="no vocabulary"))  # fmt: skip


# ---------------------------------------------------------------- eval --base
def _other_tokenizer(w, t, mutate) -> Path:
    b = copy_model(w.model, t / "base")
    tj = json.loads((b / "tokenizer.json").read_text())
    mutate(tj)
    (b / "tokenizer.json").write_text(json.dumps(tj))
    return b


def _swap_ids(tj):
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]


def _drop_merges(tj):
    tj["model"]["merges"] = tj["model"]["merges"][: len(tj["model"]["merges"]) // 2]


case("base-swapped-ids")(lambda w, t: evaluate(w, t, "--base", _other_tokenizer(w, t, _swap_ids), expect="--base"))
case("base-other-merges")(lambda w, t: evaluate(w, t, "--base", _other_tokenizer(w, t, _drop_merges), expect="--base"))
case("base-smaller-vocab")(lambda w, t: evaluate(w, t, "--base", w.small, expect="--base"))
case("base-larger-vocab")(lambda w, t: evaluate(w, t, "--base", w.model, model=w.small, expect="--base"))
case("base-nonexistent")(lambda w, t: evaluate(w, t, "--base", t / "nope", expect="no such file"))
case("eval-broken-model")(lambda w, t: evaluate(w, t, model=broken(w, t, cut(0.5), "").argv[1], expect="truncated"))
case("eval-missing-tensor")(
    lambda w, t: evaluate(w, t, model=CASES["tensor-missing"](w, t).argv[1], expect="random values")
)


# ---------------------------------------------------------------- the in-process campaign
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, world, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = CASES[name](world, tmp_path)
    try:
        before = snapshot(c.out) if c.out is not None else None
        rc, _, lines = run_inprocess(c.argv, capfd)
        check_failure(rc, lines, expect=c.expect, argparse=c.argparse)
        if c.out is not None:
            assert snapshot(c.out) == before, "the output changed"
            assert not temp_siblings(c.out), temp_siblings(c.out)
    finally:
        if c.cleanup:
            c.cleanup()
    if c.rerun:
        rc, _, lines = run_inprocess(c.rerun, capfd)
        assert rc == 0, lines
        assert c.out.exists() and not temp_siblings(c.out), temp_siblings(c.out)


def test_case_count():
    assert len(CASES) >= 80


# ---------------------------------------------------------------- --debug, internal errors, --json results
def test_debug_shows_the_traceback_error_line_last(world, tmp_path, capfd):
    rc, _, lines = run_inprocess(["--debug", "compress", world.model, "--recipe", tmp_path / "no.yaml",
                                  "--output", tmp_path / "o"], capfd)  # fmt: skip
    assert rc == 2 and any(x.startswith("Traceback") for x in lines) and lines[-1].startswith("error: recipe not found")
    rc, _, lines = run_inprocess(["compress", world.model, "--recipe", world.mag, "--output", tmp_path / "o",
                                  "--calib-samples", "0", "--debug"], capfd)  # fmt: skip
    assert rc == 2 and "Traceback" in "\n".join(lines) and lines[-1].startswith("error: --calib-samples")


def test_unexpected_exception_is_one_line_exit_1(world, tmp_path, capfd, monkeypatch):
    import llmopt.compression

    monkeypatch.setattr(llmopt.compression, "compress", lambda *a, **k: {}["boom"])
    rc, _, lines = run_inprocess(["compress", world.model, "--recipe", world.mag, "--output", tmp_path / "o"], capfd)
    assert (
        rc == 1 and len(lines) == 1 and lines[0].startswith("error: internal error KeyError") and "--debug" in lines[0]
    )


def test_json_into_a_missing_folder_is_created(world, tmp_path, capfd):
    out = tmp_path / "new" / "dir" / "r.json"
    rc, _, lines = run_inprocess(evaluate(world, tmp_path, json_out=out).argv, capfd)
    assert rc == 0 and json.loads(out.read_text())["windows"] == 2 and not temp_siblings(out), lines


def test_json_write_failure_keeps_the_results(world, tmp_path, capfd, monkeypatch):
    import llmopt.outputs
    from llmopt.errors import LLMOptError

    def full(*a, **k):
        raise LLMOptError("cannot write --json r.json: No space left on device")

    monkeypatch.setattr(llmopt.outputs, "write_text", full)
    rc, out, lines = run_inprocess(evaluate(world, tmp_path).argv, capfd)
    assert rc == 2 and len(lines) == 1 and "printed above" in lines[0]
    assert '"perplexity"' in out and "perplexity" in out.split("{")[0]


# ---------------------------------------------------------------- the CLI as a subprocess
SUBPROCESS_CASES = ["tensor-missing", "tokenizer-missing-slow-class", "calib-not-utf8", "cli-calib-samples-zero",
                    "output-unwritable-dir", "quant-codes-missing"]  # fmt: skip


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_subprocess(name, world, tmp_path, capfd):
    c = CASES[name](world, tmp_path)
    try:
        before = snapshot(c.out) if c.out is not None else None
        rc, _, lines = run_subprocess(c.argv)
        check_failure(rc, lines, expect=c.expect)
        assert c.out is None or (snapshot(c.out) == before and not temp_siblings(c.out))
    finally:
        if c.cleanup:
            c.cleanup()
    if c.rerun:
        assert run_inprocess(c.rerun, capfd)[0] == 0 and not temp_siblings(c.out)


@pytest.mark.parametrize("what", ["model", "data"])
def test_unreachable_hub_fails_at_once(what, world, tmp_path, capfd, monkeypatch):
    """No HF_HUB_OFFLINE, but the first request fails: one line at once, without retries or warnings."""
    from huggingface_hub import constants

    from llmopt import network

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    network._probe.cache_clear()
    c = compress(world, tmp_path, "nobody-xyz/nothing") if what == "model" else calib_hf(world, tmp_path)
    t0 = time.perf_counter()
    rc, _, lines = run_inprocess(c.argv, capfd)
    network._probe.cache_clear()
    check_failure(rc, lines, expect="could not be reached" if what == "model" else "unreachable")
    assert time.perf_counter() - t0 < 15 and not c.out.exists()


def calib_hf(w, t):
    return compress(w, t, None, w.sgpt, "--calib", "hf:nobody-xyz/nothing:train")


# ---------------------------------------------------------------- interruptions
def _default_sigint() -> None:
    # A test run started in the background by a non-interactive shell (`pytest &`) ignores SIGINT, and
    # children inherit an ignored signal: the command under test would then rightly ignore it too.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmopt.cli", *map(str, argv)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint)  # fmt: skip


def wait_for_temp(out: Path, proc: subprocess.Popen, timeout: float = 240) -> list[Path]:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        # the real temp sibling, not the writability probe (``.NAME.tmp-PID.probe``, created and removed
        # at once by the preflight check: a kill aimed at it would find nothing left to clean)
        found = [p for p in temp_siblings(out) if not p.name.endswith(".probe")]
        if found:
            return found
        assert proc.poll() is None, f"finished before writing: {proc.communicate()}"
        time.sleep(0.002)
    raise AssertionError("no temp sibling appeared")


def wait_for_torch(proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until the process maps libtorch (its commands import torch lazily, inside main())."""
    maps = Path(f"/proc/{proc.pid}/maps")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout and proc.poll() is None:
        if not maps.exists():
            time.sleep(1.5)
            return
        if "libtorch" in maps.read_text(errors="replace"):
            return
        time.sleep(0.005)


def interrupted_commands(w: World, t: Path, what: str, when: str):
    model = w.big if when == "writing" else w.model  # the big one writes long enough to be caught at it
    if what == "compress":
        out = t / "out"
        return ["compress", model, "--recipe", w.mag, "--output", out], out
    out = t / "m.gguf"
    return ["export", model, "--type", "f32", "--output", out], out


@pytest.mark.parametrize(
    "what,sig,when",
    [("compress", signal.SIGINT, "start"), ("compress", signal.SIGTERM, "start"), ("export", signal.SIGKILL, "start"),
     ("compress", signal.SIGINT, "writing"), ("compress", signal.SIGTERM, "writing"),
     ("compress", signal.SIGKILL, "writing"), ("export", signal.SIGTERM, "writing"),
     ("export", signal.SIGKILL, "writing")],
)  # fmt: skip
def test_interruption(what, sig, when, world, tmp_path, capfd):
    argv, out = interrupted_commands(world, tmp_path, what, when)
    proc = spawn(argv)
    if when == "start":
        wait_for_torch(proc)  # inside main(), importing torch / loading the model
    else:
        wait_for_temp(out, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    lines = [x for x in err.splitlines() if x.strip()]
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert (when == "writing") == bool(temp_siblings(out))  # what a kill leaves: cleaned by the next run
    else:
        # 128 + signal from main(); CPython may end a process that got SIGINT by re-raising it (-2)
        check_failure(proc.returncode, lines, expect=f"interrupted ({sig.name})", code=(128 + sig, -sig))
        assert not temp_siblings(out), temp_siblings(out)
    assert not out.exists()
    rc, _, lines = run_inprocess(argv, capfd)  # a rerun to the same output
    assert rc == 0, lines
    assert out.exists() and not temp_siblings(out), temp_siblings(out)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith((out.name, "." + out.name))] == [out.name]
