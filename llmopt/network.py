"""Is the Hugging Face Hub usable? Decided once, at once: ``HF_HUB_OFFLINE`` (or ``HF_DATASETS_OFFLINE``
for data) set, or one short request to the Hub endpoint failing, means offline — instead of
huggingface_hub's and datasets' retries (~30 s and a screen of warnings) before the same conclusion."""

from __future__ import annotations

import functools
import os

PROBE_TIMEOUT_S = 4.0
_TRUE = {"1", "true", "yes", "on"}


def offline_env(*names: str) -> bool:
    """True when one of the environment variables (default ``HF_HUB_OFFLINE``) is set to a true value,
    read now (not at import time)."""
    names = names or ("HF_HUB_OFFLINE",)
    if any(os.environ.get(k, "").strip().lower() in _TRUE for k in names):
        return True
    if "HF_HUB_OFFLINE" in names:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return False


@functools.lru_cache(maxsize=4)
def _probe(endpoint: str) -> bool:
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S, allow_redirects=False)
    except Exception:  # noqa: BLE001 - any network failure means "unreachable"
        return False
    return True


def hub_reachable() -> bool:
    """One short request to the Hub endpoint, without retries; remembered for the process."""
    from huggingface_hub import constants

    return _probe(constants.ENDPOINT)


def go_offline() -> None:
    """Tell huggingface_hub and datasets (imported later) to use their caches only."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover
        pass
