"""Task names → lm-eval tasks, decided before any model is loaded.

* ``--include-path DIR`` (as in lm-eval): folders of task YAMLs. When every requested task is in them,
  lm-eval's ~14,000 built-in YAMLs are not indexed at all (that index takes ~20 s on 2 cores).
* A name found nowhere is a one-line error; whether a name can be a built-in task is first decided by a
  plain substring search of lm-eval's YAML files (~2 s), so a typo fails fast.
* A task whose ``dataset_path`` is a Hub data set (not one of ``datasets``' local builders such as
  ``json``, nor an existing path) fails at once, before any model is loaded, when the Hub is unusable
  (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set, or one short request failing) and the data set is
  not cached: the error says to use ``--include-path`` with local data.
* Relative ``dataset_kwargs.data_files`` of an included YAML are resolved against the YAML's folder
  when they exist there (lm-eval alone resolves them against the current folder), so a folder of
  YAMLs with JSONL files next to them runs from anywhere.
"""

from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmopt import network
from llmopt.errors import LLMOptError, first_line

log = logging.getLogger(__name__)

#: ``datasets`` packaged builders that read local files (``dataset_path: json`` + ``data_files``)
LOCAL_BUILDERS = frozenset({"json", "csv", "text", "parquet", "arrow", "pandas", "xml", "webdataset"})
LOCAL_DATA_HINT = (
    "use --include-path DIR with task YAMLs over local data "
    "(dataset_path: json, dataset_kwargs: {data_files: {test: FILE.jsonl}})"
)


def parse_task_names(tasks: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` → ``["a", "b"]`` (order kept, duplicates dropped)."""
    items = tasks.split(",") if isinstance(tasks, str) else [x for t in tasks for x in str(t).split(",")]
    names = list(dict.fromkeys(x.strip() for x in items if x.strip()))
    if not names:
        raise LLMOptError("--tasks is empty: name one or more lm-eval tasks, e.g. --tasks arc_easy,hellaswag")
    return names


def check_include_paths(include_path: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """Existing folders of task YAMLs; one-line LLMOptError otherwise."""
    if include_path is None:
        return []
    raw = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    out = []
    for p in raw:
        path = Path(p).expanduser()
        if not path.exists():
            raise LLMOptError(f"--include-path {p} not found: give a folder of lm-eval task YAMLs")
        if not path.is_dir():
            raise LLMOptError(f"--include-path {p} is a file: give the folder that holds the task YAMLs")
        if not any(path.rglob("*.yaml")):
            raise LLMOptError(f"--include-path {p} holds no task YAMLs (*.yaml)")
        out.append(path.resolve())
    return out


def resolve_tasks(names: list[str], include: list[Path]) -> tuple[Any, list[str | dict]]:
    """A ``TaskManager`` that knows every name, and the specs to load (names, or configs whose local
    ``data_files`` were resolved). Unknown names and Hub data that cannot be reached are errors."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=[str(p) for p in include], include_defaults=False) if include else None
    missing = [n for n in names if local is None or n not in local.task_index]
    if local is not None and not missing:
        tm = local
    else:
        builtin = _scan_builtin(missing)
        unknown = [n for n in missing if n not in builtin]
        if unknown:
            raise _unknown(unknown[0], include, local)
        _check_hub([builtin[n] for n in missing if builtin[n].kind.name == "TASK"])  # fast, before the index
        log.info("indexing lm-eval's built-in tasks for %s (~20 s)", ", ".join(missing))
        tm = TaskManager(include_path=[str(p) for p in include] or None)
        unknown = [n for n in names if n not in tm.task_index]
        if unknown:
            raise _unknown(unknown[0], include, tm)
    _check_hub(_leaf_entries(tm, names))
    return tm, [_spec(tm.task_index[n], include) for n in names]


def load_tasks(tm, specs: list[str | dict]) -> list:
    """Build the tasks (this reads their data): the top-level Task / Group objects for simple_evaluate."""
    try:
        loaded = tm.load(specs)
    except LLMOptError:
        raise
    except Exception as e:  # lm-eval and datasets raise many types for a bad YAML or missing data
        hint = f"; {LOCAL_DATA_HINT}" if _offline() else ""
        raise LLMOptError(f"cannot load the task(s) {_names(specs)}: {first_line(e)}{hint}") from e
    children = {c for kids in loaded["group_map"].values() for c in kids}
    groups = [g for name, g in loaded["groups"].items() if name not in children]
    grouped = {t for g in groups for t in _task_names_under(g)}
    return groups + [t for name, t in loaded["tasks"].items() if name not in grouped]


def _task_names_under(group) -> set[str]:
    return {t.task_name for t in group.get_all_tasks()}


def _names(specs: list[str | dict]) -> str:
    return ", ".join(s if isinstance(s, str) else str(s.get("task")) for s in specs)


# ------------------------------------------------------------------ unknown names
def _builtin_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _scan_builtin(names: list[str]) -> dict[str, Any]:
    """Index entries of ``names`` among lm-eval's built-in YAMLs, parsing only the files that contain
    the name as text (a name absent from every file cannot be a task, group or tag)."""
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    wanted = {n: n.encode() for n in names}
    partial: dict[str, Any] = {}
    for path in sorted(_builtin_root().rglob("*.yaml")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if any(b in data for b in wanted.values()):
            try:
                TaskIndex.process_cfg(load_yaml(path, resolve_func=False), path, partial)
            except Exception:  # noqa: BLE001 - lm-eval's own index skips unparsable YAMLs the same way
                continue
    return {n: partial[n] for n in names if n in partial}


def _unknown(name: str, include: list[Path], tm) -> LLMOptError:
    where = f"not in --include-path {', '.join(map(str, include))} nor" if include else "not"
    known = list(tm.task_index) if tm is not None else []
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    offline = f"; offline, {LOCAL_DATA_HINT}" if _offline(probe=False) else ""
    return LLMOptError(f"unknown task '{name}': {where} among lm-eval's tasks{hint}{offline}")


# ------------------------------------------------------------------ Hub data
def _offline(probe: bool = True) -> bool:
    if network.offline_env("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        return True
    return probe and not network.hub_reachable()


def _hub_dataset(cfg: dict | None) -> str | None:
    """The Hub data set a task config reads, or None (local builder, local path, custom code)."""
    if not cfg or "class" in cfg or "custom_dataset" in cfg:
        return None
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or path in LOCAL_BUILDERS or Path(path).expanduser().exists():
        return None
    return path


def _leaf_entries(tm, names: list[str], depth: int = 0) -> list:
    """TASK entries under ``names`` (groups and tags expanded through the index)."""
    out = []
    for name in names:
        e = tm.task_index.get(name)
        if e is None or depth > 8:
            continue
        if e.kind.name in ("TASK", "PY_TASK"):
            out.append(e)
        elif e.kind.name == "TAG":
            out += _leaf_entries(tm, sorted(e.tags), depth + 1)
        elif e.kind.name == "GROUP":
            kids = (e.cfg or {}).get("task", [])
            kids = [k if isinstance(k, str) else k.get("task") for k in (kids if isinstance(kids, list) else [kids])]
            out += _leaf_entries(tm, [k for k in kids if isinstance(k, str)], depth + 1)
    return out


def _check_hub(entries: list) -> None:
    """One-line error when a task needs Hub data that cannot be had (offline and not cached)."""
    from llmopt.data import dataset_cached

    needs = [(e.name, d) for e in entries if (d := _hub_dataset(e.cfg))]
    if not needs or not _offline():
        return
    network.go_offline()  # the cached copies, without datasets' network retries
    for task, dataset in needs:
        if not dataset_cached(dataset):
            why = "HF_HUB_OFFLINE is set" if _offline(probe=False) else "the Hub is unreachable"
            raise LLMOptError(
                f"task '{task}' reads the Hub data set '{dataset}', which is not cached and {why}: {LOCAL_DATA_HINT}"
            )


# ------------------------------------------------------------------ local data files
def _spec(entry, include: list[Path]) -> str | dict:
    """The task's name, or (an included YAML with relative data_files next to it) its config with those
    paths made absolute."""
    path = entry.yaml_path
    if entry.kind.name != "TASK" or path is None or not any(_under(path, root) for root in include):
        return entry.name
    files = ((entry.cfg or {}).get("dataset_kwargs") or {}).get("data_files")
    resolved = _resolve_files(files, Path(path).parent)
    if resolved == files:
        return entry.name
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = copy.deepcopy(load_yaml(path, resolve_func=True))  # !function resolved against the YAML's folder
    cfg["dataset_kwargs"] = {**(cfg.get("dataset_kwargs") or {}), "data_files": resolved}
    return cfg


def _under(path: Path, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(root)
        return True
    except ValueError:
        return False


def _resolve_files(files: Any, folder: Path) -> Any:
    if isinstance(files, str):
        p = Path(files).expanduser()
        if p.is_absolute():
            return files
        here = any(folder.glob(files)) if any(c in files for c in "*?[") else (folder / p).exists()
        return str(folder / p) if here else files
    if isinstance(files, list):
        return [_resolve_files(f, folder) for f in files]
    if isinstance(files, dict):
        return {k: _resolve_files(v, folder) for k, v in files.items()}
    return files
