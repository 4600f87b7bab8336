"""Never lose finished work: what can be known is refused before any work; a step that fails after the
compression keeps the compressed model and every finished artifact; ``--resume`` does only what is missing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmopt.errors import LLMOptError
from llmopt.pipeline import PipelineOptions, run_pipeline
from llmopt.recipe import parse_recipe

RECIPE = {
    "name": "tiny-rtn-q4_0",
    "calibration": {"data": "self:4", "samples": 4, "seq_len": 64, "seed": 0},
    "stages": [{"stage": "rtn", "format": "q4_0"}],
}


def _no_compress(*a, **k):
    raise AssertionError("compress() ran although the run should have stopped before it / resumed after it")


@pytest.mark.parametrize(
    "recipe, export, match",
    [
        ("gptq-w3g64", "onnx", "--export onnx cannot hold"),
        ("gptq-w8", "onnx", "--export onnx cannot hold"),
        ("gptq-q8_0", "onnx", "--export onnx cannot hold"),
        ("gptq-q4_1", "onnx", "--export onnx cannot hold"),
        ("gptq-w3g64", "gguf", "--export gguf cannot hold"),
        ("rtn-w3g64", "gguf", "--export gguf cannot hold"),
    ],
)
def test_exports_that_cannot_hold_the_recipe_are_refused_before_any_work(
    recipe, export, match, tiny_model_dir, tmp_path, monkeypatch
):
    """These used to fail only after the whole compression (and deleted it)."""
    import llmopt.compression

    monkeypatch.setattr(llmopt.compression, "compress", _no_compress)
    out = tmp_path / "o"
    with pytest.raises(LLMOptError, match=match):
        run_pipeline(str(tiny_model_dir), parse_recipe(recipe), out, PipelineOptions(export=(export,)))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_harness_task_is_refused_before_any_work(tiny_model_dir, tmp_path, monkeypatch):
    import llmopt.compression

    monkeypatch.setattr(llmopt.compression, "compress", _no_compress)
    out = tmp_path / "o"
    with pytest.raises(LLMOptError, match="no_such_task_xyz"):
        run_pipeline(str(tiny_model_dir), RECIPE, out, PipelineOptions(harness_tasks="no_such_task_xyz"))
    assert not out.exists()


def test_a_failed_step_keeps_the_compression_and_resume_does_only_what_is_missing(
    tiny_model_dir, tiny_text_file, tmp_path, monkeypatch
):
    import llmopt.compression
    import llmopt.exporters

    out = tmp_path / "run"
    opts = PipelineOptions(
        export=("gguf", "onnx"), eval=True, eval_data=f"text:{tiny_text_file}#0.5:1", eval_seq_len=64,
        eval_windows=2, speed=False, threads=1, baseline=False,
    )  # fmt: skip
    real_onnx = llmopt.exporters.export_onnx

    def broken_onnx(*a, **k):
        raise LLMOptError("simulated failure of the ONNX exporter")

    monkeypatch.setattr(llmopt.exporters, "export_onnx", broken_onnx)
    with pytest.raises(LLMOptError, match=r"export onnx failed: simulated failure .* kept in .* --resume"):
        run_pipeline(str(tiny_model_dir), RECIPE, out, opts, progress=False)
    # the compression and the GGUF made before the failure survive, recorded as done
    for f in ("config.json", "model.safetensors", "quantization.json", "llmopt_report.json", "model.gguf"):
        assert (out / f).is_file(), f
    assert not (out / "onnx").exists() and not list(tmp_path.glob(".*tmp*"))
    steps = json.loads((out / "pipeline.json").read_text())["steps"]
    assert set(steps) == {"export_gguf"}
    gguf_bytes = (out / "model.gguf").read_bytes()
    weights = (out / "model.safetensors").stat().st_mtime_ns

    # rerun with --resume: no recompression, no second GGUF export; the ONNX export and evaluations run
    monkeypatch.setattr(llmopt.exporters, "export_onnx", real_onnx)
    monkeypatch.setattr(llmopt.compression, "compress", _no_compress)
    calls = []
    real_gguf = llmopt.exporters.export_gguf
    monkeypatch.setattr(llmopt.exporters, "export_gguf", lambda *a, **k: calls.append(a) or real_gguf(*a, **k))
    report = run_pipeline(str(tiny_model_dir), RECIPE, out, opts, resume=True, progress=False)
    assert calls == [] and (out / "model.gguf").read_bytes() == gguf_bytes
    assert (out / "model.safetensors").stat().st_mtime_ns == weights
    assert [r["artifact"] for r in report["rows"]] == ["input", "transformers", "gguf", "onnx"]
    assert all(r["perplexity"] > 1 for r in report["rows"])
    for f in ("onnx/model.onnx", "report.json", "report.md", "README.md", "eval/onnx.json"):
        assert (out / f).is_file(), f
    # a finished run resumed again does nothing but the report
    monkeypatch.setattr(llmopt.exporters, "export_onnx", broken_onnx)
    again = run_pipeline(str(tiny_model_dir), RECIPE, out, opts, resume=True, progress=False)
    assert again["rows"] == report["rows"]


def test_resume_refuses_another_recipe_or_a_foreign_folder(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_pipeline(str(tiny_model_dir), RECIPE, out, PipelineOptions(export=("gguf",)), progress=False)
    other = {**RECIPE, "stages": [{"stage": "rtn", "format": "q8_0"}]}
    with pytest.raises(LLMOptError, match="another recipe.*--overwrite"):
        run_pipeline(str(tiny_model_dir), other, out, PipelineOptions(export=("gguf",)), resume=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(LLMOptError, match="holds no finished compression"):
        run_pipeline(str(tiny_model_dir), RECIPE, foreign, PipelineOptions(export=("gguf",)), resume=True)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_cli_failure_after_compression_says_what_to_do(tiny_model_dir, tmp_path):
    """From the command line: a one-line error naming the step, exit 2, the compressed folder kept."""
    out = tmp_path / "o"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(RECIPE))
    bad_data = tmp_path / "missing-later.txt"  # readable at the check, gone when the evaluation reads it
    bad_data.write_text("x " * 2000)
    r = subprocess.run(
        [sys.executable, "-c", "import sys, llmopt.pipeline.steps as s\n"
         "def boom(*a, **k):\n    from llmopt.errors import LLMOptError\n    raise LLMOptError('disk full')\n"
         "s.evaluate_one = boom\nimport llmopt.pipeline.run as r\nr.evaluate_one = boom\n"
         "from llmopt.cli import main\nsys.exit(main(sys.argv[1:]))",
         "compress", str(tiny_model_dir), "--recipe", str(recipe), "--output", str(out), "--eval",
         "--eval-data", f"text:{bad_data}", "--eval-seq-len", "32", "--eval-windows", "1", "--no-baseline"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: eval input failed: disk full") and "--resume" in last
    assert (out / "model.safetensors").is_file() and (out / "pipeline.json").is_file()
