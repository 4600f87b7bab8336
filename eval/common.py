"""Shared plumbing of the benchmarks: one dense reference, compressions in subprocesses (so each
one's peak RSS is its own), evaluation on the same windows with cached dense logits for KL."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.nounk.txt"
CALIB = f"text:{TEXT}#0:0.5"  # calibration: first half of the WikiText-2 validation text
EVAL = f"text:{TEXT}#0.5:1"  # evaluation: the second half, never seen by calibration
MODEL = "bundled:smollm2"
# A second evaluation text for choosing defaults on more than one distribution: English news prose (the
# Lee corpus, 300 ABC news documents) shipped inside the gensim wheel as gensim/test/test_data/
# lee_background.cor. Never committed; fetched without installing anything into the project::
#   pip download gensim==4.4.0 --no-deps -d /tmp/textpkg && cd /tmp/textpkg && \
#   unzip -o gensim-*.whl gensim/test/test_data/lee_background.cor && \
#   mkdir -p /tmp/text && cp gensim/test/test_data/lee_background.cor /tmp/text/lee_background.txt
LEE = Path(os.environ.get("LLMOPT_LEE_TEXT", "/tmp/text/lee_background.txt"))
# A third text, held out from every choice of defaults: Usenet posts (200 messages of the 20 Newsgroups
# corpus, headers removed) pickled inside the same gensim wheel as gensim/test/test_data/mini_newsgroup
# (zlib-compressed pickle of a scikit-learn Bunch). `python eval/common.py newsgroups` writes it, after the
# wheel is unpacked as above (unzip ... 'gensim/test/test_data/mini_newsgroup').
NEWSGROUPS = Path(os.environ.get("LLMOPT_NEWSGROUPS_TEXT", "/tmp/text/newsgroups.txt"))


def write_newsgroups(pickled: Path, out: Path = NEWSGROUPS) -> None:
    """gensim's mini_newsgroup pickle → plain text: each message's body (after its header block), in order,
    separated by blank lines. Unpickles only the Bunch (as a dict), builtins and numpy arrays, nothing else."""
    import io
    import pickle
    import zlib

    class Bunch(dict):
        def __setstate__(self, state):
            self.update(state)

    SAFE = {("copy_reg", "_reconstructor"), ("__builtin__", "object"), ("__builtin__", "dict"),
            ("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}  # fmt: skip

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if name == "Bunch":
                return Bunch
            if (module, name) in SAFE:
                return super().find_class(module.replace("numpy.core", "numpy._core"), name)
            raise pickle.UnpicklingError(f"refusing {module}.{name}")

    data = Unpickler(io.BytesIO(zlib.decompress(pickled.read_bytes())), encoding="latin1").load()
    bodies = [m.split("\n\n", 1)[1].strip() if "\n\n" in m else m.strip() for m in data["data"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(bodies))


def require_text() -> None:
    if not TEXT.is_file():
        sys.exit(f"benchmark needs {TEXT} (see ../shared/data/README.md); not found")


class CachedBackend:
    """Wraps a backend and keeps its logits per window (fp16, ~200 MB per 2048-token window of a
    49k vocabulary) so every compressed model is compared with the same dense distributions."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.model_spec = inner.model_spec
        self.vocab_size = inner.vocab_size
        self.threads = inner.threads
        self._cache: dict[bytes, torch.Tensor] = {}

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        key = ids.numpy().tobytes()
        if key not in self._cache:
            self._cache[key] = self.inner.logits(ids).to(torch.float16)
        return self._cache[key].float()


def alternating_speed(
    files: dict[str, Path], rounds: int, threads: int, torch_label: str | None = None
) -> dict[str, list[dict]]:
    """llama.cpp speed of each GGUF file in ``rounds`` alternating rounds (A, B, C, A, B, C, ...): one
    512-token prompt and 128 greedy tokens per file per round, after one untimed warm-up each, so the
    drift of a shared host over minutes falls on every file alike. Per file: each round's prefill/decode.
    ``torch_label``: the bundled model in torch float32 eager is timed in the same rounds under that key
    (the reference of a speed ratio)."""
    from llmopt.backends.llamacpp_backend import LlamaCppBackend

    prompt = torch.randint(100, 40000, (1, 512), generator=torch.Generator().manual_seed(0))
    backends = {k: LlamaCppBackend(str(f), threads=threads) for k, f in files.items()}
    if torch_label is not None:
        from llmopt.backends.torch_backend import TorchBackend

        backends[torch_label] = TorchBackend.from_spec(MODEL, threads=threads)
    runs: dict[str, list[dict]] = {k: [] for k in backends}
    try:
        for k, be in backends.items():
            be.time_generation(prompt, 128 if k == torch_label else 16)  # torch: the timed shape (its KV cache)
        for _ in range(rounds):
            for k, be in backends.items():
                r = be.time_generation(prompt, 128)
                runs[k].append({"prefill": r.prefill_tok_s, "decode": r.decode_tok_s})
    finally:
        for be in backends.values():
            be.close()
    return runs


def round_medians(rounds: list[dict]) -> tuple[float, float, list[float]]:
    """One file's alternating rounds (:func:`alternating_speed`): prefill median, decode median, decode [min, max]."""
    dec = [x["decode"] for x in rounds]
    return statistics.median(x["prefill"] for x in rounds), statistics.median(dec), [min(dec), max(dec)]


def run_compress(recipe: str | dict, out_dir: Path, extra: list[str] | None = None, model: str = MODEL) -> dict:
    """``llmopt compress`` of ``model`` in a fresh process; returns its report (times, peak RSS)."""
    if isinstance(recipe, dict):
        import yaml

        fd, path = tempfile.mkstemp(suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(recipe, f)
        recipe = path
    cmd = [
        sys.executable,
        "-m",
        "llmopt.cli",
        "compress",
        model,
        "--recipe",
        recipe,
        "--output",
        str(out_dir),
        "--overwrite",
        "--calib",
        CALIB,
        *(extra or []),
    ]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    report = json.loads((out_dir / "llmopt_report.json").read_text())
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return report


def evaluate_folder(spec, base, seq_len: int, max_windows: int, data: str = EVAL):
    """Perplexity (and KL against ``base`` when given) of a model spec or backend on ``data`` (default:
    the EVAL text)."""
    from llmopt.evaluation import evaluate

    return evaluate(spec, data=data, seq_len=seq_len, max_windows=max_windows, base=base, progress=False)


def describe_text(spec: str) -> str:
    """A data spec as a results file may name it: relative to the repo, the uncommitted texts by their name here."""
    if str(LEE) in spec:
        return "the Lee news text (`LEE` in `eval/common.py`, extracted from gensim's test data, not committed)"
    if str(NEWSGROUPS) in spec:
        return "the 20 Newsgroups text (`NEWSGROUPS` in `eval/common.py`, not committed)"
    return f"`{spec.replace(str(REPO.parent), '..')}`"


def eval_texts(specs: list[str] | None) -> dict[str, str]:
    """``--eval NAME=SPEC`` options → {name: data spec}; none given: {"wiki2-valid-2nd-half": EVAL}.

    "lee" alone means the Lee news text (``LEE``, see above), "newsgroups" the Usenet text (``NEWSGROUPS``);
    they must exist."""
    out = {}
    for item in specs or []:
        if item == "lee":
            if not LEE.is_file():
                sys.exit(f"{LEE} not found; see LEE in eval/common.py for how to extract it (not committed)")
            out["lee-news"] = f"text:{LEE}"
            continue
        if item == "newsgroups":
            if not NEWSGROUPS.is_file():
                sys.exit(f"{NEWSGROUPS} not found; see NEWSGROUPS in eval/common.py for how to make it (not committed)")
            out["newsgroups"] = f"text:{NEWSGROUPS}"
            continue
        name, _, spec = item.partition("=")
        out[name] = spec
    return out or {"wiki2-valid-2nd-half": EVAL}


def text_bench_args(description: str, windows: int, windows_help: str, out: str) -> argparse.ArgumentParser:
    """The options every llama.cpp text benchmark shares: windows, seq-len, threads, extra texts, output."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--windows", type=int, default=windows, help=windows_help)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument(
        "--eval",
        action="append",
        help="NAME=DATA_SPEC extra evaluation text (repeatable); 'lee' = Lee news, 'newsgroups' = 20 Newsgroups",
    )
    ap.add_argument("--out", default=str(REPO / "eval" / "results" / out))
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing <out>.json")
    return ap


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan for fewer than two values)."""
    n = len(xs)
    mean = sum(xs) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n) if n > 1 else float("nan")
    return mean, se


def paired_diff(a: list[float], b: list[float]) -> tuple[float, float, float, int, int]:
    """Per-window a − b (the first min(len) windows): mean, 95% t-interval (lo, hi) with windows as the unit,
    the number of windows where a is lower, and the number of windows."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b, strict=False)]
    n = len(d)
    mean, se = mean_se(d)
    half = stats.t.ppf(0.975, n - 1) * se if n > 1 else float("nan")
    return mean, mean - half, mean + half, sum(x < 0 for x in d), n


def shipped_calibration(recipe: str) -> dict:
    """A shipped recipe's calibration block with its defaults (sizes and seed; benches replace the data)."""
    import yaml

    from llmopt.recipe import CalibrationConfig

    raw = yaml.safe_load((REPO / "configs" / f"{recipe}.yaml").read_text())
    return CalibrationConfig(**raw.get("calibration", {})).model_dump()


def out_flag(out: str | Path, default: str) -> str:
    """`` --out eval/results/NAME`` for a result's "Produced by" line; empty where NAME is the default."""
    name = Path(out).name
    return "" if name == default else f" --out eval/results/{name}"


def fmt(x: float, nd: int = 3) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def machine_note() -> str:
    import platform

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__" and sys.argv[1:2] == ["newsgroups"]:
    write_newsgroups(Path(sys.argv[2]) if len(sys.argv) > 2 else Path("gensim/test/test_data/mini_newsgroup"))
    print(NEWSGROUPS)
