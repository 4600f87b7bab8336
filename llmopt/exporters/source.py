"""Where an exporter reads its model from, decided before any weight is loaded."""

from __future__ import annotations

from pathlib import Path


def local_folder(spec: str) -> Path | None:
    """The HF folder of ``spec`` when it is one already on disk (no download, no GGUF conversion)."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.exists() or spec.startswith("bundled:") or "/" not in spec:
        return None
    try:  # a Hub id: its config alone, from the HF cache when offline
        from huggingface_hub import hf_hub_download

        from llmopt import network

        offline = network.offline_env() or not network.hub_reachable()
        return Path(hf_hub_download(spec, "config.json", local_files_only=offline)).parent
    except Exception:  # noqa: BLE001 - load_model reports Hub problems in its own words
        return None
