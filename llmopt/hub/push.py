"""``llmopt push DIR REPO_ID``: upload an output folder to the Hugging Face Hub with a model card.

Through ``huggingface_hub``: ``create_repo(exist_ok=True)`` (``private`` applies when the repo is created),
``create_branch(exist_ok=True)`` for a ``revision`` other than ``main``, then one ``create_commit`` with a
``CommitOperationAdd`` per file (atomic on the Hub: all files or none). The files are those
``upload_folder`` would take (:func:`upload_files`). The card goes up as ``README.md``: the generated one
(:mod:`llmopt.hub.card`, sent from memory) unless the folder has its own ``README.md``, which is then
uploaded as it is. The folder itself is never modified unless ``save_card`` asks to write the generated
card into it as ``README.md`` (atomically, :func:`llmopt.outputs.write_text`).

The token is ``token``, else ``HF_TOKEN``, else the saved login (``hf auth login``); it is never printed,
logged or written. Hub and network failures become one-line :class:`LLMOptError` messages (missing token,
401, 403, 404, 5xx, connection refused); success is reported only after the commit returned.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from llmopt.errors import LLMOptError
from llmopt.hub.artifacts import BASELINE_DIR, README
from llmopt.hub.card import build_card
from llmopt.outputs import write_text

_REPO_ID_HELP = "OWNER/NAME, e.g. my-user/smollm2-sparsegpt50"


@dataclass
class PushResult:
    repo_id: str
    revision: str
    files: list[tuple[str, int]]  # (path in the repo, bytes), README.md included
    card: str  # the README.md uploaded (or that would be)
    card_source: str  # "generated" or "folder" (the folder's own README.md)
    dry_run: bool
    url: str | None = None
    commit_url: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(n for _, n in self.files)


def upload_files(folder: Path) -> list[tuple[str, int]]:
    """The files to upload from ``folder``: all but ``upload_folder``'s default ignore patterns (``.git``, caches)
    and ``baseline/`` (llama.cpp's own quantization of the input model, a reference row of the report)."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    ignore = [*DEFAULT_IGNORE_PATTERNS, f"{BASELINE_DIR}/*"]
    rel = {p.relative_to(folder).as_posix(): p for p in sorted(folder.glob("**/*")) if p.is_file()}
    return [(r, rel[r].stat().st_size) for r in filter_repo_objects(rel, ignore_patterns=ignore)]


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1:
        raise LLMOptError(f"repo id '{repo_id}' needs an owner: {_REPO_ID_HELP}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise LLMOptError(f"invalid repo id '{repo_id}': {str(e).splitlines()[0]} ({_REPO_ID_HELP})") from None


def _operations(folder: Path, files: list[tuple[str, int]], card: str | None) -> list:
    """One ``CommitOperationAdd`` per file of ``files`` (read from ``folder``), ``README.md`` = ``card``
    when given."""
    from huggingface_hub import CommitOperationAdd

    ops = [
        CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel))
        for rel, _ in files
        if card is None or rel != README
    ]
    if card is not None:
        ops.append(CommitOperationAdd(path_in_repo=README, path_or_fileobj=card.encode("utf-8")))
    return ops


def _one_line(text: str, token: str | None, limit: int = 200) -> str:
    line = next((x.strip() for x in str(text).splitlines() if x.strip()), "")
    if token:
        line = line.replace(token, "***")
    return line if len(line) <= limit else line[: limit - 1] + "…"


@contextlib.contextmanager
def _hub_errors(step: str, repo_id: str, revision: str, endpoint: str, token: str | None):
    """Turn what huggingface_hub / requests raise into one ``LLMOptError`` line (token never included)."""
    import requests
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise LLMOptError(f"{step}: HF_HUB_OFFLINE is set; unset it to push to {endpoint}") from None
    except HfHubHTTPError as e:
        code = e.response.status_code if e.response is not None else None
        server = _one_line(getattr(e, "server_message", "") or "", token)
        if code == 401:
            msg = "the Hub refused the token (401 Unauthorized): set a valid HF_TOKEN or run `hf auth login`"
        elif code == 403:
            msg = f"permission denied (403 Forbidden): the token cannot write to {repo_id} (needs write access)"
        elif code == 404:
            msg = f"not found (404): check the repo id {repo_id} and the revision '{revision}'"
        elif code is not None and code >= 500:
            msg = f"the Hub answered {code} (server error); nothing was committed, try again later"
        else:
            msg = f"the Hub answered {code}"
        raise LLMOptError(f"{step}: {msg}" + (f" [{server}]" if server and code != 401 else "")) from None
    except (requests.ConnectionError, requests.Timeout) as e:
        kind = "timed out" if isinstance(e, requests.Timeout) else "connection failed"
        raise LLMOptError(
            f"{step}: cannot reach the Hub at {endpoint} ({kind}); check the network or HF_ENDPOINT"
        ) from None
    except ValueError as e:  # huggingface_hub's README.md metadata validation, bad arguments
        raise LLMOptError(f"{step}: {_one_line(e, token)}") from None


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    base_model: str | None = None,
    save_card: bool = False,
    token: str | None = None,
) -> PushResult:
    """Upload ``folder`` (an ``llmopt compress`` output, with any GGUF / ONNX exports and eval JSON put in
    it) to the model repo ``repo_id`` with a model card; ``dry_run`` lists the files and the card, uploads
    nothing and needs no token. ``base_model`` overrides the card's base model (default: the report's
    source model when it is a Hub id or ``bundled:``). ``save_card`` also writes the generated card into
    ``folder`` as ``README.md`` (replacing one there), atomically, before uploading."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LLMOptError(f"no such folder: {folder} (push uploads a model folder, e.g. an llmopt compress output)")
    check_repo_id(repo_id)
    revision = revision or "main"
    files = [(r, n) for r, n in upload_files(folder) if r != README]
    if not files:
        raise LLMOptError(f"folder {folder} has no files to upload")
    notes = []
    own = folder / README
    if own.is_file() and not save_card:
        card, source = own.read_text(encoding="utf-8"), "folder"
        notes.append(f"using {own} as the model card (pass --save-card to replace it with a generated one)")
    else:
        card, source = str(build_card(folder, repo_id, base_model)), "generated"
        if save_card:
            write_text(own, card, flag="the model card")
            notes.append(f"wrote the generated card to {own}")
    files.append((README, len(card.encode("utf-8"))))
    result = PushResult(repo_id, revision, files, card, source, dry_run, notes=notes)
    if dry_run:
        return result

    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise LLMOptError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    api = HfApi(token=token)
    where = f"{repo_id}@{revision}"
    with _hub_errors(f"creating repo {repo_id}", repo_id, revision, api.endpoint, token):
        result.url = str(api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
    if revision != "main":
        with _hub_errors(f"creating branch {where}", repo_id, revision, api.endpoint, token):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    with _hub_errors(f"uploading to {where}", repo_id, revision, api.endpoint, token):
        info = api.create_commit(
            repo_id=repo_id,
            operations=_operations(folder, files, card if source == "generated" else None),
            commit_message=commit_message or f"Upload {folder.name} with llmopt",
            repo_type="model",
            revision=revision,
        )
    result.commit_url = info.commit_url
    return result


def format_push(r: PushResult) -> str:
    """What ``llmopt push`` prints: the file list with sizes (and the card on a dry run), or the commit."""
    size = f"{len(r.files)} files, {r.total_bytes / 2**20:.2f} MiB"
    lines = list(r.notes)
    if r.dry_run:
        lines.append(f"dry run: would upload {size} to {r.repo_id}@{r.revision} (nothing uploaded)")
        lines += [f"  {n:>12,d}  {p}" + ("  (model card)" if p == README else "") for p, n in r.files]
        lines += [f"--- {README} ({r.card_source} model card) ---", r.card.rstrip()]
    else:
        lines.append(f"pushed {size} to {r.repo_id}@{r.revision}: {r.commit_url}")
    return "\n".join(lines)
