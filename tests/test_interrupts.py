"""Ctrl-C means stop, in every phase: SIGINT ends ``llmopt compress`` with exit 130 (SIGTERM 143), one last
``error: interrupted (...)`` line and nothing half-written, wherever the run is when it arrives.

Each test runs the real command in a subprocess held at one point of its run by
:mod:`tests.interrupt_point` (start-up: torch importing numpy; loading; calibration; compression; writing
the temporary sibling; the rename onto the output; the interpreter's exit), sends the signal there and
lets it go on. An interrupt before the rename leaves no output (no folder, no ``.out.tmp-*`` sibling) and
an existing output byte-identical; a rename that has begun is completed, so an interrupt during it leaves
the complete new output, as one arriving after it does; the exit code is 128 + signal in every case.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

SAVED = {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "llmopt_report.json"}


@pytest.fixture(scope="module")
def recipes(tmp_path_factory, tiny_text_file) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("recipes")
    bodies = {
        "mag": "stages:\n  - stage: magnitude\n    sparsity: 0.5\n",
        "sgpt": f"calibration: {{data: 'text:{tiny_text_file}', samples: 2, seq_len: 16}}\n"
        "stages:\n  - stage: sparsegpt\n    sparsity: 0.5\n",
    }
    for name, body in bodies.items():
        (d / f"{name}.yaml").write_text(body)
    return {name: d / f"{name}.yaml" for name in bodies}


def _default_sigint() -> None:
    # a test run started in the background by a non-interactive shell ignores SIGINT, and children
    # inherit an ignored signal: the command would then rightly ignore it too
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_at(when: str, argv: list, sig: int, tmp_path: Path) -> tuple[int, str, list[str]]:
    """Run ``llmopt ARGV`` held at ``when`` (tests.interrupt_point), send ``sig`` there, let it go on;
    returns the exit code, stdout and the stderr lines."""
    marker = tmp_path / "held"
    out_f, err_f = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out_f.open("w") as out, err_f.open("w") as err:
        cmd = [sys.executable, "-m", "tests.interrupt_point", str(marker), when, *map(str, argv)]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, preexec_fn=_default_sigint)
        try:
            t0 = time.monotonic()
            while not marker.exists():
                assert proc.poll() is None, f"ended (exit {proc.returncode}) before {when}: {err_f.read_text()}"
                assert time.monotonic() - t0 < 240, f"never reached {when}"
                time.sleep(0.005)
            proc.send_signal(sig)
            marker.unlink()  # let it go on: the signal is on its way
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = [x for x in err_f.read_text().splitlines() if x.strip()]
    return proc.returncode, out_f.read_text(), lines


def check_interrupted(rc: int, lines: list[str], sig: int) -> None:
    text = "\n".join(lines)
    assert rc == 128 + sig, f"exit code {rc}, want {128 + sig}:\n{text}"
    assert lines and lines[-1].startswith(f"error: interrupted ({signal.Signals(sig).name})"), text
    assert "Traceback" not in text and "Exception ignored" not in text, text


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "phase,sig",
    [("start-up", signal.SIGINT), ("start-up", signal.SIGTERM), ("loading", signal.SIGINT),
     ("calibration", signal.SIGINT), ("compression", signal.SIGINT), ("writing", signal.SIGINT)],
)  # fmt: skip
def test_interrupt_stops_the_run(phase, sig, tiny_model_dir, tiny_text_file, recipes, tmp_path):
    when = {
        "start-up": "import:numpy",  # torch's C start-up imports numpy, and dropped an exception raised there
        "loading": f"open:{tiny_model_dir / 'config.json'}",
        "calibration": f"open:{tiny_text_file}",
        "compression": "call:llmopt.stages.pruning:SparseGPTStage.prune",
        "writing": "open:.out.tmp-",  # a file inside the temporary sibling
    }[phase]
    out = tmp_path / "out"
    rc, stdout, lines = interrupt_at(when, ["compress", tiny_model_dir, "--recipe", recipes["sgpt"], "--output", out],
                                     sig, tmp_path)  # fmt: skip
    check_interrupted(rc, lines, sig)
    assert not out.exists() and not leftovers(out), leftovers(out)
    assert "saved" not in stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_while_writing_keeps_the_existing_output(sig, tiny_model_dir, recipes, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    before = snapshot(out)
    argv = ["compress", tiny_model_dir, "--recipe", recipes["mag"], "--output", out, "--overwrite"]
    rc, _, lines = interrupt_at("open:.out.tmp-", argv, sig, tmp_path)
    check_interrupted(rc, lines, sig)
    assert snapshot(out) == before and not leftovers(out), leftovers(out)


def test_interrupt_during_the_rename_completes_it(tiny_model_dir, recipes, tmp_path):
    """The rename onto an existing output runs with SIGINT/SIGTERM deferred (the old output moved aside,
    the new one renamed in, the old one removed): the interrupt acts once it is done, never in between."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    argv = ["compress", tiny_model_dir, "--recipe", recipes["mag"], "--output", out, "--overwrite"]
    rc, _, lines = interrupt_at("os.rename:.out.tmp-", argv, signal.SIGINT, tmp_path)
    check_interrupted(rc, lines, signal.SIGINT)
    assert not leftovers(out), leftovers(out)
    assert SAVED <= {p.name for p in out.iterdir()} and not (out / "old.txt").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_while_exiting(sig, tiny_model_dir, recipes, tmp_path):
    """Once the command has returned, Python would report an exception raised at its exit and exit 0."""
    out = tmp_path / "out"
    argv = ["compress", tiny_model_dir, "--recipe", recipes["mag"], "--output", out]
    rc, stdout, lines = interrupt_at("exit", argv, sig, tmp_path)
    check_interrupted(rc, lines, sig)
    assert "saved" in stdout and SAVED <= {p.name for p in out.iterdir()} and not leftovers(out)
