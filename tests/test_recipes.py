"""Shipped recipes by name: package data (also in a built wheel), ``--recipe NAME``, ``llmopt recipes``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from llmopt.cli import main
from llmopt.errors import LLMOptError
from llmopt.recipe import RECIPES_DIR, parse_recipe, recipe_summary, shipped_recipes

REPO = Path(__file__).resolve().parents[1]


def test_configs_is_the_package_recipe_folder():
    names = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert names == sorted(p.name for p in RECIPES_DIR.glob("*.yaml")) and len(names) >= 20
    assert (REPO / "configs").resolve() == RECIPES_DIR  # one copy: configs/ links to llmopt/recipes/
    assert {"sparsegpt-50", "gptq-q4_0", "wanda-2of4", "rtn-w8"} <= set(shipped_recipes())


def test_every_recipe_says_what_it_does():
    for name, path in shipped_recipes().items():
        s = recipe_summary(path)
        assert 10 < len(s) <= 110 and "\n" not in s, (name, s)
        assert parse_recipe(path).name == name  # file name and recipe name agree


def test_by_name_anywhere(tmp_path, monkeypatch):
    ref = parse_recipe(REPO / "configs" / "sparsegpt-50.yaml")
    monkeypatch.chdir(tmp_path)  # not the checkout: names resolve through the package
    assert parse_recipe("sparsegpt-50") == ref
    assert parse_recipe("sparsegpt-50.yaml") == ref
    with pytest.raises(LLMOptError) as e:
        parse_recipe("sparsegpt-51")
    msg = str(e.value)
    assert "unknown recipe 'sparsegpt-51'" in msg and "sparsegpt-50" in msg and "\n" not in msg
    with pytest.raises(LLMOptError, match="recipe not found: sub/sparsegpt-50.yaml"):
        parse_recipe("sub/sparsegpt-50.yaml")  # a path with a folder is a path, not a name
    # a file in the current folder wins over the shipped recipe of the same name
    (tmp_path / "sparsegpt-50.yaml").write_text("name: mine\nstages: [{stage: magnitude, sparsity: 0.5}]\n")
    assert parse_recipe("sparsegpt-50.yaml").name == "mine"


def test_compress_cli_with_recipe_name(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compress", str(tiny_model_dir), "--recipe", "magnitude-50", "--output", "out"]) == 0
    assert "name: magnitude-50" in (tmp_path / "out" / "recipe.yaml").read_text()


def test_recipes_command_lists_each_once(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [x.split()[0] for x in lines] == list(shipped_recipes())
    by_name = {x.split()[0]: x for x in lines}
    assert "SparseGPT (Frantar & Alistarh 2023): 50% unstructured" in by_name["sparsegpt-50"]
    assert "Wanda 2:4" in by_name["wanda-2of4"]


def test_recipes_in_built_wheel(tmp_path):
    """Build the wheel from a copy of the sources (no network, no build isolation) and look inside."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "llmopt", src / "llmopt", ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    p = subprocess.run([*cmd, "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("llmopt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"llmopt/recipes/{p.name}" for p in RECIPES_DIR.glob("*.yaml")}
    assert shipped <= names
