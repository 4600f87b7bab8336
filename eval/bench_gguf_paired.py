"""Shipped GPTQ q4_0 vs llama.cpp's Q4_0 + imatrix, window by window, run by llama.cpp.

``bench_gguf.py`` scores one file at a time against a cached F32 reference, which holds every window's
full logits in memory (~200 MB each): fine for a few windows, not for whole texts. Here every file is
open at once and each window is run through the F32 reference and every quantized file in turn, so
nothing is cached and the number of windows is limited only by time. Per text: perplexity with its
standard error over windows, KL against F32, same top-1, and the paired per-window difference of the
two quantized files (a 95% t-interval with windows as the unit). Calibration and imatrix: the same
32 x 512-token windows (seed 0) of the first half of ``valid.nounk.txt``; q8_0 token embedding in both.

    python eval/bench_gguf_paired.py [--windows 32 | --windows 0 (every window)] [--eval lee]
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gguf import EMB, paired_section  # noqa: E402
from common import (  # noqa: E402,E501
    CALIB,
    EVAL,
    MODEL,
    REPO,
    cleanup,
    describe_text,
    eval_texts,
    machine_note,
    markdown_table,
    mean_se,
    require_text,
    run_compress,
    text_bench_args,
)

ROWS = ["llama.cpp Q4_0 + imatrix", "llmopt GPTQ q4_0 (shipped gptq-q4_0)"]


def build(work: Path, threads: int) -> dict[str, tuple[Path, float]]:
    from llmopt.exporters import export_gguf

    files = {}
    f32 = work / "f32.gguf"
    export_gguf(MODEL, str(f32), type="f32")
    files["llama.cpp F32"] = (f32, float("nan"))
    t0 = time.perf_counter()
    path = work / "imatrix-q4_0.gguf"
    export_gguf(MODEL, str(path), type="q4_0", embedding_type=EMB, imatrix=CALIB, imatrix_samples=32,
                imatrix_seq_len=512, threads=threads)  # fmt: skip
    files[ROWS[0]] = (path, time.perf_counter() - t0)
    folder = work / "compressed"
    rep = run_compress(str(REPO / "configs" / "gptq-q4_0.yaml"), folder)
    path = work / "gptq-q4_0.gguf"
    export_gguf(str(folder), str(path), type="auto", embedding_type=EMB)
    cleanup(folder)
    files[ROWS[1]] = (path, rep["compress_seconds"])
    return files


def score(backends: dict, windows: torch.Tensor, name: str) -> dict[str, dict]:
    """Per model: each window's mean NLL, KL vs the F32 reference and same-top-1 count."""
    ref_label = "llama.cpp F32"
    out = {k: dict(window_nll=[], window_kl=[], top1=0) for k in backends}
    for w in tqdm(windows, desc=f"{name}: windows x {len(backends)} files"):
        target = w[1:, None]
        logq = F.log_softmax(backends[ref_label].logits(w)[:-1].float(), -1)
        for label, be in backends.items():
            logp = logq if label == ref_label else F.log_softmax(be.logits(w)[:-1].float(), -1)
            o = out[label]
            o["window_nll"].append(float(-logp.gather(1, target).double().mean()))
            o["window_kl"].append(float((logq.exp() * (logq - logp)).sum(-1).clamp_min(0).double().mean()))
            o["top1"] += int((logq.argmax(-1) == logp.argmax(-1)).sum())
            del logp
    n_tok = windows.shape[0] * (windows.shape[1] - 1)
    for o in out.values():
        n = len(o["window_nll"])
        mean, se = mean_se(o["window_nll"])
        o.update(ppl=math.exp(mean), ppl_se=math.exp(mean) * se, kl_mean=sum(o["window_kl"]) / n,
                 top1=o["top1"] / n_tok, windows=n)  # fmt: skip
    return out


def main() -> None:
    ap = text_bench_args(__doc__.splitlines()[0], 32, "windows per text; 0 = every window", "gguf-q4_0-paired")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out + ".json").read_text())["rows"], args.out + ".png")
        return
    logging.basicConfig(level=logging.WARNING)
    require_text()
    texts = {"wiki2-2nd-half": EVAL, **(eval_texts(args.eval) if args.eval else {})}

    from llmopt.backends.llamacpp_backend import LlamaCppBackend
    from llmopt.data import evaluation_tokens
    from llmopt.metrics import make_windows
    from llmopt.models import load_tokenizer

    tok = load_tokenizer(MODEL)
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-paired-"))
    try:
        files = build(work, args.threads)
        backends = {k: LlamaCppBackend(str(p), threads=args.threads) for k, (p, _) in files.items()}
        results = {}
        for name, spec in texts.items():
            windows = make_windows(evaluation_tokens(spec, tok), args.seq_len, args.windows or None)
            results[name] = score(backends, windows, name)
        for be in backends.values():
            be.close()
        sizes = {k: p.stat().st_size / 2**20 for k, (p, _) in files.items()}
    finally:
        cleanup(work)

    header = ["model", "file MiB", "quantize s"] + [
        c for n in texts for c in (f"ppl {n} (± se over windows)", f"KL {n}", f"same top-1 {n}")
    ]
    rows = []
    records = []
    for label, (_, seconds) in files.items():
        rows.append([label, f"{sizes[label]:.1f}", f"{seconds:.1f}"] + [
            c for n in texts for c in (f"{results[n][label]['ppl']:.3f} ± {results[n][label]['ppl_se']:.3f}",
                                       f"{results[n][label]['kl_mean']:.4f}", f"{100 * results[n][label]['top1']:.1f}%")
        ])  # fmt: skip
        first = results["wiki2-2nd-half"][label]
        records.append(dict(label=label, file_mib=sizes[label], quantize_seconds=seconds,
                            window_nll=first["window_nll"], texts={n: results[n][label] for n in texts}))  # fmt: skip
    n_windows = ", ".join(f"{n}: {results[n][ROWS[0]]['windows']}" for n in texts)
    md = [
        "# GGUF q4_0, window by window: shipped gptq-q4_0 vs llama.cpp Q4_0 + imatrix, run by llama.cpp",
        "",
        f"SmolLM2-135M-Instruct (bundled). {args.seq_len}-token windows ({n_windows}; "
        + ("every window" if not args.windows else f"the first {args.windows} of each text")
        + "), each scored by the F32 GGUF and both Q4_0 files in the same pass; KL against F32 on the same "
        "tokens. Calibration and imatrix: the same 32 x 512-token windows (seed 0) of the first half of "
        f"`valid.nounk.txt`. Token embedding (tied output) {EMB} in both quantized files. Texts: "
        + ", ".join(f"`{n}` = {describe_text(s)}" for n, s in texts.items())
        + ". `quantize s`: llama.cpp's quantizer with its imatrix pass, or llmopt's layer-wise engine.",
        "",
        markdown_table(header, rows),
        *paired_section(records, "shipped,imatrix", list(texts)),
        "",
        f"Machine: {machine_note()}. Produced by `python eval/bench_gguf_paired.py --windows {args.windows}"
        + "".join(f" --eval {e}" for e in args.eval or [])
        + "`.",
    ]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"rows": records}, indent=1))
    plot(records, args.out + ".png")
    print("\n".join(md))


def plot(records: list[dict], path: str) -> None:
    """Per text: each window's NLL of the two quantized files minus the F32 file's (lower is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = next(r for r in records if r["label"] == "llama.cpp F32")
    names = list(ref["texts"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        base = ref["texts"][name]["window_nll"]
        for r, marker in zip([r for r in records if r is not ref], "os", strict=False):
            t = r["texts"][name]
            d = [x - y for x, y in zip(t["window_nll"], base, strict=True)]
            ax.plot(
                range(len(d)), d, marker=marker, lw=1, label=f"{r['label']} (ppl {t['ppl']:.2f}, KL {t['kl_mean']:.3f})"
            )
        ax.set_title(f"{name}: NLL above F32 per 2048-token window")
        ax.set_xlabel("window")
        ax.set_ylabel("mean NLL − F32's (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
