"""Data specs: one string names where calibration and evaluation tokens come from.

=====================================  ==========================================================
spec                                    meaning
=====================================  ==========================================================
``wikitext2``                           Hub ``Salesforce/wikitext`` / ``wikitext-2-raw-v1``; train split for
                                        calibration, test split for evaluation, rows joined with "\\n\\n"
                                        (as in the GPTQ/SparseGPT reference code)
``c4``                                  Hub ``allenai/c4`` (GPTQ/SparseGPT protocol): calibration windows
                                        sampled inside documents of train shard 0
                                        (``en/c4-train.00000-of-01024.json.gz``) longer than the window;
                                        evaluation on the first 1100 documents of validation shard 0
                                        (``en/c4-validation.00000-of-00008.json.gz``) joined with " ",
                                        256 windows by default
``text:PATH[#A:B]``                     a local UTF-8 text file; ``#A:B`` keeps the fraction A..B of it
                                        (cut at line breaks), e.g. ``#0:0.5`` and ``#0.5:1`` give disjoint
                                        calibration and evaluation halves
``hf:NAME[:CONFIG]:SPLIT[:COLUMN]``     any Hub dataset; COLUMN defaults to ``text``
``self:N``                              calibration only: N sequences sampled from the model itself
                                        (no data needed; Liu et al. 2023 "LLM-QAT" data-free generation)
=====================================  ==========================================================

Calibration follows the GPTQ paper: the text is tokenized once and N windows of L tokens start at
uniformly random offsets drawn with a seeded RNG (for ``c4``: a random document longer than L, then a
random offset inside it, as the reference ``datautils.get_c4``). Evaluation tokenizes the whole text
once; the metric code cuts it into non-overlapping windows. Calibration and evaluation never read the
same text for the named data sets (different splits / shards).

With ``HF_HUB_OFFLINE`` set, a Hub data spec whose data set is not in the local cache fails at once with
a one-line error (no network retries).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmopt import network
from llmopt.errors import LLMOptError, read_text

log = logging.getLogger(__name__)

# GPTQ/SparseGPT c4 protocol (IST-DASLab/gptq datautils.py get_c4): calibration from train shard 0,
# evaluation from the first 1100 documents of validation shard 0 joined with " ", 256 windows.
C4_DATASET = "allenai/c4"
C4_CALIB_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_EVAL_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_WINDOWS = 256
WIKITEXT2_DATASET, WIKITEXT2_CONFIG = "Salesforce/wikitext", "wikitext-2-raw-v1"

OFFLINE_HINT = "the Hub is not reachable here: use text:PATH (a local file) or self:N (model-generated) instead"


@dataclass(frozen=True)
class DataSpec:
    kind: str  # "wikitext2" | "c4" | "text" | "hf" | "self"
    path: str = ""  # text: file path; hf: dataset name
    config: str | None = None
    split: str | None = None
    column: str = "text"
    fraction: tuple[float, float] = (0.0, 1.0)
    n_samples: int = 0  # self:N
    raw: str = ""  # the spec as the user wrote it

    def __str__(self) -> str:
        return self.raw or self.kind


def parse_data_spec(spec: str) -> DataSpec:
    """Parse a data spec string; raise LLMOptError naming the valid forms when it is malformed."""
    valid = "valid data specs: wikitext2, c4, text:PATH[#A:B], hf:NAME[:CONFIG]:SPLIT[:COLUMN], self:N"
    s = spec.strip()
    if s in ("wikitext2", "wikitext-2"):
        out = DataSpec("wikitext2")
    elif s == "c4":
        out = DataSpec("c4")
    elif s.startswith("text:"):
        path, frac = s[5:], (0.0, 1.0)
        if "#" in path:
            path, _, rng = path.rpartition("#")
            try:
                a, b = (float(x) for x in rng.split(":"))
            except ValueError:
                raise LLMOptError(f"bad fraction '#{rng}' in data spec '{spec}': use #A:B, e.g. #0:0.5") from None
            if not 0.0 <= a < b <= 1.0:
                raise LLMOptError(f"bad fraction '#{rng}' in data spec '{spec}': need 0 <= A < B <= 1")
            frac = (a, b)
        if not path:
            raise LLMOptError(f"data spec '{spec}' has no path; {valid}")
        out = DataSpec("text", path=path, fraction=frac)
    elif s.startswith("hf:"):
        parts = s[3:].split(":")
        if len(parts) == 2:
            name, split, config, column = parts[0], parts[1], None, "text"
        elif len(parts) == 3:
            name, config, split, column = parts[0], parts[1], parts[2], "text"
        elif len(parts) == 4:
            name, config, split, column = parts
        else:
            raise LLMOptError(f"cannot parse '{spec}': use hf:NAME[:CONFIG]:SPLIT[:COLUMN]")
        out = DataSpec("hf", path=name, config=config or None, split=split, column=column)
    elif s.startswith("self:"):
        try:
            n = int(s[5:])
        except ValueError:
            n = 0
        if n <= 0:
            raise LLMOptError(f"bad data spec '{spec}': self:N needs a positive number of sequences, e.g. self:32")
        out = DataSpec("self", n_samples=n)
    else:
        raise LLMOptError(f"unknown data spec '{spec}'; {valid}")
    return dataclasses.replace(out, raw=s)


def _hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set (read now, not at import time)."""
    return network.offline_env("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _hub_reachable() -> bool:
    """One short request to the Hub (no retries): a failed first request means offline."""
    return network.hub_reachable()


def dataset_cached(name: str) -> bool:
    """Whether anything of Hub dataset ``name`` is in the local caches (datasets' or huggingface_hub's).

    Paths are resolved as ``datasets.config`` does, without importing ``datasets`` (seconds).
    """
    from huggingface_hub import constants

    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    candidates = (
        datasets_cache.expanduser() / name.replace("/", "___"),
        Path(constants.HF_HUB_CACHE) / ("datasets--" + name.replace("/", "--")),
    )
    return any(p.is_dir() for p in candidates)


def _hub_documents(
    name: str, config: str | None, split: str, column: str, data_files=None, limit: int | None = None
) -> Sequence[str]:
    """The ``column`` of a Hub dataset split, one string per row (the first ``limit`` rows when given).

    Offline (HF_HUB_OFFLINE) with nothing cached raises a one-line LLMOptError at once instead of
    letting ``datasets`` retry the network.
    """
    offline = _hub_offline()
    if offline and not dataset_cached(name):
        raise LLMOptError(f"dataset '{name}' is not cached and HF_HUB_OFFLINE is set; {OFFLINE_HINT}")
    if not offline and not _hub_reachable():
        if not dataset_cached(name):
            raise LLMOptError(f"dataset '{name}' is not cached and the Hugging Face Hub is unreachable; {OFFLINE_HINT}")
        network.go_offline()  # use the cached copy without datasets' network retries
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a hard dependency
        raise LLMOptError(f"the datasets package is needed for Hub data ({e})") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, data_files=data_files)
    except Exception as e:  # network errors surface as many exception types
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise LLMOptError(f"could not load dataset '{name}' ({msg}); {OFFLINE_HINT}") from None
    if column not in ds.column_names:
        raise LLMOptError(f"dataset '{name}' has no column '{column}'; columns: {', '.join(ds.column_names)}")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds[column]


def _hub_dataset(name: str, config: str | None, split: str, column: str, data_files=None) -> str:
    """A Hub dataset split's ``column`` joined with "\\n\\n" (the GPTQ reference code's wikitext2 joining)."""
    return "\n\n".join(_hub_documents(name, config, split, column, data_files=data_files))


def c4_documents(role: str) -> Sequence[str]:
    """c4 documents: train shard 0 for calibration, the first 1100 of validation shard 0 for evaluation."""
    if role == "calib":
        return _hub_documents(C4_DATASET, None, "train", "text", data_files={"train": C4_CALIB_FILE})
    return _hub_documents(
        C4_DATASET, None, "validation", "text", data_files={"validation": C4_EVAL_FILE}, limit=C4_EVAL_DOCUMENTS
    )


def load_text(spec: DataSpec | str, role: str = "eval") -> str:
    """The raw text behind a spec. ``role`` ('calib' or 'eval') picks the split of wikitext2 and c4.

    c4 evaluation text is the first 1100 validation documents joined with " " (the papers' protocol);
    c4 calibration text (train shard documents joined with "\\n\\n") is only for callers that want the
    text itself: :func:`calibration_windows` samples inside documents instead.
    """
    if role not in ("calib", "eval"):
        raise ValueError(f"role must be 'calib' or 'eval', got {role!r}")
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "self":
        raise LLMOptError("self:N generates calibration tokens from the model; it cannot be used for evaluation")
    if spec.kind == "text":
        p = Path(spec.path).expanduser()
        if not p.exists():
            raise LLMOptError(f"text file not found: {p} (data spec text:PATH needs an existing UTF-8 file)")
        _require_regular_file(p)
        text = read_text(p, "text file")
        if not text.strip():
            raise LLMOptError(f"text file {p} is empty (data spec text:PATH needs text)")
        a, b = spec.fraction
        if (a, b) != (0.0, 1.0):
            text = _slice_at_lines(text, a, b)
        return text
    if spec.kind == "wikitext2":
        split = "train" if role == "calib" else "test"
        return _hub_dataset(WIKITEXT2_DATASET, WIKITEXT2_CONFIG, split, "text")
    if spec.kind == "c4":
        return ("\n\n" if role == "calib" else " ").join(c4_documents(role))
    assert spec.kind == "hf"
    return _hub_dataset(spec.path, spec.config, spec.split or "train", spec.column)


def _require_regular_file(p: Path) -> None:
    """Refuse a named pipe, socket or device before opening it: reading a FIFO without a writer blocks forever.

    A folder is left to :func:`read_text`, whose error already says so.
    """
    mode = p.stat().st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    what = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    raise LLMOptError(f"text file {p} is {what}, not a regular file (data spec text:PATH needs a regular UTF-8 file)")


def _slice_at_lines(text: str, a: float, b: float) -> str:
    """Characters a..b (fractions) of ``text``, both ends moved forward to the next line break."""

    def cut(f: float) -> int:
        if f <= 0.0:
            return 0
        if f >= 1.0:
            return len(text)
        i = text.find("\n", int(f * len(text)))
        return len(text) if i < 0 else i + 1

    return text[cut(a) : cut(b)]


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once, no special tokens added: (T,) int64.

    The tokenizer decides about BOS itself (llmopt's GGUF tokenizers follow the file's add_bos flag);
    ``add_special_tokens=False`` keeps HF tokenizers that would add one per call from adding it here.
    """
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def evaluation_tokens(spec: DataSpec | str, tokenizer) -> torch.Tensor:
    """Token stream for evaluation: (T,) int64."""
    return tokenize_text(tokenizer, load_text(spec, role="eval"))


def calibration_windows(
    spec: DataSpec | str,
    tokenizer,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    model=None,
) -> torch.Tensor:
    """N calibration windows of L tokens: (N, L) int64.

    GPTQ-paper sampling: the text is tokenized once and each window starts at ``rng.randint(0, T−L−1)``
    with ``random.Random(seed)``, so the same (spec, N, L, seed) always gives the same windows. ``c4``
    samples inside the documents of its train shard instead (:func:`sample_document_windows`).
    """
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    if n_samples <= 0 or seq_len <= 1:
        raise LLMOptError(f"calibration needs samples >= 1 and seq_len >= 2 (got {n_samples}, {seq_len})")
    if spec.kind == "self":
        if model is None:
            raise LLMOptError("self:N calibration needs the model to sample from")
        return sample_from_model(model, tokenizer, spec.n_samples, seq_len, seed)
    if spec.kind == "c4":
        return sample_document_windows(c4_documents("calib"), tokenizer, n_samples, seq_len, seed)
    ids = tokenize_text(tokenizer, load_text(spec, role="calib"))
    if ids.numel() < seq_len + 1:
        raise LLMOptError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}: "
            "use more text or a shorter --calib-seq-len"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seq_len - 1) for _ in range(n_samples)]
    return torch.stack([ids[s : s + seq_len] for s in starts])


def sample_document_windows(
    documents: Sequence[str], tokenizer, n_samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """N windows of L tokens, each inside one document longer than L: (N, L) int64.

    The GPTQ reference sampler for c4 (``datautils.get_c4``): with ``random.Random(seed)``, pick a random
    document, pick again while it has <= L tokens, then take L tokens at ``rng.randint(0, T−L−1)``. The
    draws are the reference code's (same RNG calls in the same order); documents are tokenized without
    special tokens, like every llmopt text. Deterministic for (documents, tokenizer, N, L, seed).
    """
    if n_samples <= 0 or seq_len <= 1:
        raise LLMOptError(f"calibration needs samples >= 1 and seq_len >= 2 (got {n_samples}, {seq_len})")
    if len(documents) == 0:
        raise LLMOptError("calibration data has no documents")
    rng = random.Random(seed)
    short: set[int] = set()  # documents seen with <= L tokens: all of them short means no window fits
    out = []
    for _ in tqdm(range(n_samples), desc="sampling calibration windows", leave=False, disable=None):
        while True:
            i = rng.randint(0, len(documents) - 1)
            if i in short:
                continue
            ids = tokenize_text(tokenizer, documents[i])  # (T,)
            if ids.numel() > seq_len:
                break
            short.add(i)
            if len(short) == len(documents):
                raise LLMOptError(
                    f"no calibration document has more than {seq_len} tokens: use a shorter --calib-seq-len"
                )
        s = rng.randint(0, ids.numel() - seq_len - 1)
        out.append(ids[s : s + seq_len])
    return torch.stack(out)


@torch.inference_mode()
def sample_from_model(model, tokenizer, n: int, seq_len: int, seed: int = 0, batch_size: int = 8) -> torch.Tensor:
    """N sequences of L tokens sampled from the model itself (temperature 1, full vocabulary): (N, L).

    Each sequence starts from BOS (or EOS when the tokenizer has no BOS); data-free calibration as in
    LLM-QAT (Liu et al. 2023, §2.1), without their top-k switch so the samples cover the distribution.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise LLMOptError("self:N needs a tokenizer with a BOS or EOS token to start sampling from")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    out = []
    for b0 in range(0, n, batch_size):
        b = min(batch_size, n - b0)
        ids = torch.full((b, 1), start, dtype=torch.long, device=device)
        past = None
        nxt = ids
        for _ in range(seq_len - 1):
            res = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = res.past_key_values
            probs = torch.softmax(res.logits[:, -1, :].float(), dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=gen).to(device)
            ids = torch.cat([ids, nxt], dim=1)
        out.append(ids.cpu())
    log.info("sampled %d calibration sequences of %d tokens from the model", n, seq_len)
    return torch.cat(out)
