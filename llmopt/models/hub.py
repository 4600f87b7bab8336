"""Hugging Face Hub models: existence / cache checks without huggingface_hub's long offline retries, and
the download of the top-level config, tokenizer and safetensors files."""

from __future__ import annotations

import logging

from llmopt import network
from llmopt.errors import LLMOptError, first_line
from llmopt.models.specs import BUNDLED_PREFIX

log = logging.getLogger(__name__)

_HUB_FILE_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".py", ".jinja", ".tiktoken")


def _hub_offline() -> bool:
    return network.offline_env()


def _hub_reachable() -> bool:
    """One short request to the Hub endpoint, without huggingface_hub's retries (~20 s when offline)."""
    return network.hub_reachable()


def _not_found_offline(repo_id: str) -> LLMOptError:
    return LLMOptError(
        f"model '{repo_id}' not found: not a local folder or .gguf file, and the Hugging Face Hub could "
        f"not be reached (offline?) — pass a local folder, a .gguf file, or {BUNDLED_PREFIX}smollm2"
    )


def _check_hub_model(repo_id: str) -> bool:
    """Make sure ``repo_id`` exists (online) or is cached (offline); return True when offline."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise LLMOptError(f"'{repo_id}' is not a local file or folder, nor a valid Hub model id (owner/name)") from e
    offline = _hub_offline() or not _hub_reachable()
    if offline:
        network.go_offline()  # no retries anywhere later (transformers, datasets)
    try:
        hf_hub_download(repo_id, "config.json", local_files_only=offline)
    except LocalEntryNotFoundError as e:  # offline (or unreachable) and not in the HF cache
        raise _not_found_offline(repo_id) from e
    except GatedRepoError as e:
        raise LLMOptError(
            f"model '{repo_id}' is gated: accept its terms on huggingface.co and run `hf auth login`"
        ) from e
    except RepositoryNotFoundError as e:
        raise LLMOptError(
            f"model '{repo_id}' not found: not a local folder or .gguf file, and no such repository on the "
            "Hugging Face Hub (private? run `hf auth login`) — check the spelling"
        ) from e
    except EntryNotFoundError as e:
        raise LLMOptError(f"Hub repository '{repo_id}' has no config.json: not a transformers model") from e
    if offline:
        log.info("Hugging Face Hub unreachable or HF_HUB_OFFLINE set: using the cached copy of %s", repo_id)
    return offline


def _download_hub_model(repo_id: str, *, weights: bool = True) -> str:
    """Download the top-level config, tokenizer and (if ``weights``) safetensors files of ``repo_id``.

    Returns the local snapshot folder. Offline (or Hub unreachable), the cached snapshot is used.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = _check_hub_model(repo_id)
    try:
        if offline:
            return snapshot_download(repo_id, local_files_only=True)
        suffixes = _HUB_FILE_SUFFIXES if weights else tuple(s for s in _HUB_FILE_SUFFIXES if s != ".safetensors")
        files = [f for f in HfApi().list_repo_files(repo_id) if "/" not in f and f.endswith(suffixes)]
        if weights and not any(f.endswith(".safetensors") for f in files):
            raise LLMOptError(f"Hub model '{repo_id}' has no *.safetensors weights: llmopt loads safetensors only")
        return snapshot_download(repo_id, allow_patterns=files)
    except LocalEntryNotFoundError as e:
        raise _not_found_offline(repo_id) from e
    except HfHubHTTPError as e:
        raise LLMOptError(f"could not download '{repo_id}' from the Hugging Face Hub: {first_line(e)}") from e
