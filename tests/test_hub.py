"""``llmopt push``: the model card of an output folder, and the upload against a fake Hub on loopback.

huggingface_hub reads ``HF_ENDPOINT`` when it is imported, so every real push runs the CLI in a
subprocess whose environment points it at the :class:`FakeHub` (no saved login, no proxy, not offline)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fake_hub import FakeHub

REPO_ID = "tester/tiny-sparsegpt"
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def output_dir(tiny_model_dir, tiny_text_file, tmp_path_factory) -> Path:
    """An llmopt sparsegpt-50 output of the tiny model, plus an eval JSON, a GGUF and an ONNX folder."""
    from llmopt.compression import compress
    from llmopt.evaluation import evaluate

    out = tmp_path_factory.mktemp("push") / "tiny-sgpt50"
    compress(
        str(tiny_model_dir), "sparsegpt-50", out, calib=f"text:{tiny_text_file}", calib_samples=4, calib_seq_len=32
    )
    r = evaluate(str(out), data=f"text:{tiny_text_file}#0.5:1", seq_len=32, max_windows=2, base=str(tiny_model_dir))
    (out / "eval.json").write_text(json.dumps(r.to_dict(), indent=1))
    # the same numbers filed as an evaluation on a Hub data set: only those belong in the card's model-index
    (out / "eval-wikitext2.json").write_text(json.dumps({**r.to_dict(), "data": "wikitext2"}, indent=1))
    (out / "tiny-f32.gguf").write_bytes(b"GGUF" + bytes(60))  # the card only lists artifacts
    (out / "onnx").mkdir()
    (out / "onnx" / "model.onnx").write_bytes(b"\x08\x07" + bytes(30))
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_push(args: list[str], endpoint: str, token: str | None, tmp_path: Path, **extra_env: str):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_")) and "proxy" not in k.lower()
    }
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), NO_PROXY="127.0.0.1,localhost")
    env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if token is not None:
        env["HF_TOKEN"] = token
    env.update(extra_env)
    cmd = [sys.executable, "-c", "import sys; from llmopt.cli import main; sys.exit(main())", "push", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_push_uploads_exactly_the_folder_and_a_card(output_dir, tmp_path):
    from huggingface_hub import ModelCard

    from llmopt.hub.push import upload_files

    before = snapshot(output_dir)
    with FakeHub() as hub:
        p = run_push([str(output_dir), REPO_ID, "--base-model", BASE], hub.url, hub.token, tmp_path)
    assert p.returncode == 0, p.stderr
    assert len(hub.commits) == 1
    c = hub.commits[0]
    assert (c["repo"], c["revision"]) == (REPO_ID, "main") and hub.repos[REPO_ID]["private"] is False
    expected = {rel for rel, _ in upload_files(output_dir)} | {"README.md"}
    assert set(c["files"]) == expected
    for rel, data in c["files"].items():
        if rel != "README.md":
            assert data == before[rel], rel
    assert {"model.safetensors", "llmopt_report.json", "recipe.yaml", "eval.json", "onnx/model.onnx"} <= expected
    assert snapshot(output_dir) == before  # the user's folder is untouched (no README.md written)
    assert set(hub.validated) == {c["files"]["README.md"].decode()}  # the card metadata went through validation
    assert f"pushed {len(expected)} files" in p.stdout and hub.url in p.stdout and hub.token not in p.stdout + p.stderr

    readme = tmp_path / "README.md"
    readme.write_bytes(c["files"]["README.md"])
    card = ModelCard.load(readme)
    d = card.data
    assert d.base_model == BASE and d.base_model_relation == "finetune"  # pruned only: no "pruned" relation on the Hub
    assert d.library_name == "transformers" and d.pipeline_tag == "text-generation"
    assert {"llmopt", "sparse", "sparsegpt", "gguf", "onnx"} <= set(d.tags) and "quantized" not in d.tags
    report = json.loads((output_dir / "eval.json").read_text())
    ppl = [e for e in d.eval_results if e.metric_type == "perplexity"]
    kl = [e for e in d.eval_results if e.metric_type == "kl_divergence"]
    assert d.model_name == "tiny-sparsegpt"
    assert ppl[0].metric_value == pytest.approx(report["perplexity"], rel=1e-4)
    assert kl[0].metric_value == pytest.approx(report["kl"]["mean"], rel=1e-3, abs=1e-4)
    assert ppl[0].task_type == "text-generation"
    # model-index: the Hub data set only; the evaluation on the local text file stays in the card's table
    assert [e.dataset_type for e in d.eval_results] == ["Salesforce/wikitext"] * 2
    text = card.text
    assert "## Evaluation" in text and f"{report['perplexity']:.3f}" in text and f"| `{report['data']}` |" in text
    assert f'from_pretrained("{REPO_ID}")' in text and "--hf-file tiny-f32.gguf" in text
    assert 'subfolder="onnx"' in text and "ORTModelForCausalLM" in text
    assert "```yaml" in text and (output_dir / "recipe.yaml").read_text().strip() in text
    assert "sparsity 50.00%" in text and "SparseGPT (Frantar & Alistarh 2023)" in text


def test_push_revision_private_and_own_readme(output_dir, tmp_path):
    folder = tmp_path / "own"
    shutil.copytree(output_dir, folder)
    own = "---\nlicense: apache-2.0\ntags: [mine]\n---\n# my own card\n"
    (folder / "README.md").write_text(own)
    with FakeHub() as hub:
        p = run_push([str(folder), REPO_ID, "--private", "--commit-message", "first"], hub.url, hub.token, tmp_path)
        assert p.returncode == 0, p.stderr
        p = run_push([str(folder), REPO_ID, "--revision", "q4"], hub.url, hub.token, tmp_path)  # repo exists: 409
        assert p.returncode == 0, p.stderr
    first, second = hub.commits
    assert first["revision"] == "main" and first["summary"] == "first" and hub.repos[REPO_ID]["private"] is True
    assert second["revision"] == "q4" and "q4" in hub.repos[REPO_ID]["branches"] and "@q4" in p.stdout
    assert first["files"]["README.md"].decode() == own and "using" in p.stdout
    assert ("POST", "/api/repos/create", 409) in hub.requests


@pytest.mark.parametrize(
    "fail, token, needle",
    [
        ({}, "hf_wrong_token_abcdefgh", "401"),
        ({"create": 403}, None, "403"),
        ({"commit": 500}, None, "500"),
        ({"preupload": 404}, None, "404"),
    ],
)
def test_push_hub_errors_are_one_line_and_never_success(output_dir, tmp_path, fail, token, needle):
    before = snapshot(output_dir)
    with FakeHub(fail=fail) as hub:
        p = run_push([str(output_dir), REPO_ID], hub.url, token or hub.token, tmp_path)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr
    assert "pushed" not in p.stdout and not hub.commits
    assert (token or hub.token) not in p.stdout + p.stderr
    assert snapshot(output_dir) == before


def test_push_without_token_or_hub(output_dir, tmp_path):
    with FakeHub() as hub:
        p = run_push([str(output_dir), REPO_ID], hub.url, None, tmp_path)
    assert p.returncode == 2 and not hub.requests
    assert p.stderr.strip().count("\n") == 0 and "no Hugging Face token" in p.stderr and "HF_TOKEN" in p.stderr
    p = run_push([str(output_dir), REPO_ID], closed_port_url(), "hf_some_token_value", tmp_path)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "cannot reach the Hub at http://127.0.0.1:" in p.stderr and "hf_some_token_value" not in p.stderr
    with FakeHub() as hub:
        p = run_push([str(output_dir), REPO_ID], hub.url, hub.token, tmp_path, HF_HUB_OFFLINE="1")
    assert p.returncode == 2 and not hub.requests and "HF_HUB_OFFLINE is set" in p.stderr, p.stderr


def test_dry_run_lists_files_and_card_without_token(output_dir, capsys, monkeypatch):
    from llmopt.cli import main
    from llmopt.hub.push import upload_files

    monkeypatch.delenv("HF_TOKEN", raising=False)
    before = snapshot(output_dir)
    assert main(["push", str(output_dir), REPO_ID, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: would upload" in out and "nothing uploaded" in out
    for rel, size in upload_files(output_dir):
        assert f"{size:,d}  {rel}" in out
    assert "README.md  (model card)" in out and "base_model" not in out  # local source, no --base-model
    assert "model-index:" in out and "## How to run" in out
    assert snapshot(output_dir) == before


def test_save_card_writes_readme(output_dir, tmp_path):
    from huggingface_hub import ModelCard

    import llmopt

    folder = tmp_path / "f"
    shutil.copytree(output_dir, folder)
    r = llmopt.push(folder, REPO_ID, dry_run=True, save_card=True, base_model=BASE)
    assert (folder / "README.md").read_text() == r.card and r.card_source == "generated"
    assert ModelCard.load(folder / "README.md").data.base_model == BASE
    assert not list(folder.glob(".README.md.tmp-*"))


def test_bad_inputs(tmp_path, output_dir):
    import llmopt
    from llmopt.errors import LLMOptError

    with pytest.raises(LLMOptError, match="no such folder"):
        llmopt.push(tmp_path / "missing", REPO_ID, dry_run=True)
    with pytest.raises(LLMOptError, match="needs an owner"):
        llmopt.push(output_dir, "just-a-name", dry_run=True)
    with pytest.raises(LLMOptError, match="invalid repo id"):
        llmopt.push(output_dir, "me/bad name!", dry_run=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMOptError, match="no files to upload"):
        llmopt.push(tmp_path / "empty", REPO_ID, dry_run=True)


def test_card_without_a_repo_loads_from_the_folder(output_dir):
    """Nothing pushed: "How to run" names the folder path, never a made-up repo id; with a repo id, the repo."""
    from llmopt.hub.card import build_card

    for card, where in [(build_card(output_dir, None), str(output_dir)),
                        (build_card(output_dir, None, local_path="runs/tiny"), "runs/tiny")]:  # fmt: skip
        text = card.text
        assert f'AutoModelForCausalLM.from_pretrained("{where}")' in text
        assert f'llama-cli -m {where}/tiny-f32.gguf -p "The capital of France is"' in text
        assert f'ORTModelForCausalLM.from_pretrained("{where}/onnx")' in text and "subfolder" not in text
        assert f"\nllmopt eval {where} --data wikitext2" in text
        assert "local/" not in text and "--hf-repo" not in text and "hf download" not in text
        assert card.data.model_name == Path(where).name and text.lstrip().startswith(f"# {Path(where).name}\n")
    text = build_card(output_dir, REPO_ID).text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}")' in text and f"--hf-repo {REPO_ID}" in text
    assert f'ORTModelForCausalLM.from_pretrained("{REPO_ID}", subfolder="onnx")' in text
    assert f"hf download {REPO_ID} --local-dir model && llmopt eval model" in text and str(output_dir) not in text


def test_card_of_a_quantized_bundled_output(tiny_model_dir, tmp_path):
    from llmopt.compression import compress
    from llmopt.hub.card import build_card, hub_base_model

    assert hub_base_model("bundled:smollm2") == BASE and hub_base_model("org/model") == "org/model"
    assert hub_base_model(str(tiny_model_dir)) is None and hub_base_model("./x/y/z") is None
    out = tmp_path / "rtn"
    compress(str(tiny_model_dir), "rtn-w8", out)
    report = json.loads((out / "llmopt_report.json").read_text())
    report["model"] = "bundled:smollm2"  # as if made from the bundled model
    (out / "llmopt_report.json").write_text(json.dumps(report))
    card = build_card(out, "me/rtn")
    d = card.data
    assert d.base_model == BASE and d.base_model_relation == "quantized" and "quantized" in d.tags
    assert "pruned" not in d.tags and "sparse" not in d.tags  # int8 rounding zeros are not pruning
    assert "--base bundled:smollm2" in card.text
    assert d.eval_results is None and "No evaluation results" in card.text
    assert "quantization.safetensors" in card.text and "bits/weight" in card.text
    meta = yaml.safe_load(str(card).split("---")[1])
    assert meta["base_model"] == BASE and "model-index" not in meta


def test_baseline_folder_is_never_pushed(output_dir, tmp_path):
    """baseline/ holds llama.cpp's own quantization of the input (the report's reference row): not this model."""
    import shutil

    from llmopt.hub.push import upload_files

    folder = tmp_path / "with-baseline"
    shutil.copytree(output_dir, folder)
    (folder / "baseline").mkdir()
    (folder / "baseline" / "llama.cpp-q4_0-imatrix.gguf").write_bytes(b"GGUF")
    files = {rel for rel, _ in upload_files(folder)}
    assert files == {rel for rel, _ in upload_files(output_dir)} and not any(f.startswith("baseline/") for f in files)
