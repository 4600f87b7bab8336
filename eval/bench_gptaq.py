"""GPTAQ (asymmetric calibration) against the shipped GPTQ q4_0, window by window, run by llama.cpp.

Every variant is the shipped ``configs/gptq-q4_0.yaml`` with GPTAQ's fields changed (``asymmetric``,
``asym_alpha``, ``asym_form``; :mod:`llmopt.kernels.gptaq`), compressed by ``llmopt compress`` in its own
process (calibration: 32 x 512 tokens of the first half of ``valid.nounk.txt``, seed 0, the same windows for
every variant), exported to GGUF (q8_0 token embedding, llama.cpp's tensor types) and scored by llama.cpp
window by window beside the F32 GGUF: perplexity, KL against F32 and same top-1 on the second half of
``valid.nounk.txt`` and on texts nothing calibrates on (``--eval lee``, ``--eval newsgroups``). Each variant is
paired with the shipped config window by window (a 95% t-interval over windows, for NLL and for KL).

GGUF files and per-window results are cached in ``--work``, so an interrupted run resumes and ``--variants``
can grow between runs. Compression seconds and peak RSS are measured but, on a shared machine, indicative only.

    python eval/bench_gptaq.py [--windows 16] [--eval lee] [--eval newsgroups] [--variants gptq,gptaq,...]
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gguf import EMB  # noqa: E402
from common import (  # noqa: E402
    EVAL,
    MODEL,
    REPO,
    cleanup,
    describe_text,
    eval_texts,
    machine_note,
    markdown_table,
    mean_se,
    paired_diff,
    require_text,
    run_compress,
    text_bench_args,
)

SHIPPED = REPO / "configs" / "gptq-q4_0.yaml"
# name: (description, overrides of the shipped gptq stage)
VARIANTS = {
    "gptq": ("shipped gptq-q4_0 (GPTQ)", {}),
    "gptaq": ("GPTAQ, α = 0.25 (GPTQModel's default)", {"asymmetric": True}),
    "gptaq-a1": ("GPTAQ, α = 1 (the paper's Eq. 18 as written)", {"asymmetric": True, "asym_alpha": 1.0}),
    "exact-a025": ("exact start W + α W G H⁻¹, α = 0.25", {"asymmetric": True, "asym_form": "exact"}),
    "exact-a1": ("exact start W + α W G H⁻¹, α = 1", {"asymmetric": True, "asym_form": "exact", "asym_alpha": 1.0}),
}
REF = "gptq"


def build(name: str, work: Path, quick: bool) -> Path:
    """The variant's GGUF (cached in ``work``); its compression report beside it."""
    from llmopt.exporters import export_gguf

    path = work / f"{name}.gguf"
    if path.exists():
        return path
    if name == "f32":
        export_gguf(MODEL, str(work / "f32.partial.gguf"), type="f32")
    else:
        recipe = yaml.safe_load(SHIPPED.read_text())
        recipe["name"] = f"gptq-q4_0-{name}"
        recipe["stages"][0].update(VARIANTS[name][1])
        if quick:
            recipe["calibration"].update(samples=8, seq_len=256)
        folder = work / f"{name}-folder"
        rep = run_compress(recipe, folder)
        keep = {k: rep.get(k) for k in ("compress_seconds", "wall_seconds", "peak_rss_mib")}
        (work / f"{name}.report.json").write_text(json.dumps(keep))
        export_gguf(str(folder), str(work / f"{name}.partial.gguf"), type="auto", embedding_type=EMB)
        cleanup(folder)
    (work / f"{name}.partial.gguf").rename(path)
    return path


def score(names: list[str], work: Path, texts: dict[str, str], n_windows: int, seq_len: int, threads: int) -> dict:
    """Per text, per variant, per window: mean NLL, mean KL vs the F32 GGUF, same-top-1 count. Cached in
    ``work``/scores.json after every window; the F32 logits of a window are computed once for all variants."""
    from llmopt.backends.llamacpp_backend import LlamaCppBackend
    from llmopt.data import evaluation_tokens
    from llmopt.metrics import make_windows
    from llmopt.models import load_tokenizer

    cache = work / "scores.json"
    res = json.loads(cache.read_text()) if cache.exists() else {}
    tok = load_tokenizer(MODEL)
    backends: dict = {}

    def backend(name: str):
        if name not in backends:
            backends[name] = LlamaCppBackend(str(build(name, work, n_windows <= 2)), threads=threads)
        return backends[name]

    for text, spec in texts.items():
        windows = make_windows(evaluation_tokens(spec, tok), seq_len, n_windows or None)
        per = res.setdefault(text, {})
        for k, w in enumerate(tqdm(windows, desc=text)):
            todo = [n for n in names if len(per.setdefault(n, [])) <= k]
            if not todo:
                continue
            target = w[1:, None]
            logq = F.log_softmax(backend("f32").logits(w)[:-1].float(), -1)
            for n in todo:
                logp = F.log_softmax(backend(n).logits(w)[:-1].float(), -1)
                kl = (logq.exp() * (logq - logp)).sum(-1).clamp_min(0).double().mean()
                top1 = (logq.argmax(-1) == logp.argmax(-1)).sum()
                nll = -logp.gather(1, target).double().mean()
                per[n].append(dict(nll=float(nll), kl=float(kl), top1=int(top1), tokens=len(target)))
            cache.write_text(json.dumps(res))
    for be in backends.values():
        be.close()
    return {t: {n: v[:n_windows] if n_windows else v for n, v in per.items() if n in names} for t, per in res.items()}


def summarise(scores: dict, names: list[str]) -> dict:
    """Per text and variant: ppl ± se over windows, mean KL, top-1, and the paired differences against REF."""
    out: dict = {}
    for text, per in scores.items():
        for n in names:
            ws = per[n]
            nll = [w["nll"] for w in ws]
            kl = [w["kl"] for w in ws]
            mean, se = mean_se(nll)
            s = dict(windows=len(ws), ppl=math.exp(mean), ppl_se=math.exp(mean) * se, kl=sum(kl) / len(kl),
                     top1=sum(w["top1"] for w in ws) / sum(w["tokens"] for w in ws))  # fmt: skip
            if n != REF:
                ref = per[REF]
                s["d_nll"] = paired_diff(nll, [w["nll"] for w in ref])
                s["d_kl"] = paired_diff(kl, [w["kl"] for w in ref])
            out.setdefault(text, {})[n] = s
    return out


def main() -> None:
    ap = text_bench_args(__doc__.splitlines()[0], 16, "windows per text; 0 = every window", "gptaq")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--work", default="/tmp/bench-gptaq", help="GGUF files and the per-window cache")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 windows, 8 x 256 calibration, own --work")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    require_text()
    if args.quick:
        args.windows, args.work = 2, args.work + "-quick"
    names = args.variants.split(",")
    if REF not in names or any(n not in VARIANTS for n in names):
        sys.exit(f"--variants must include {REF} and come from {', '.join(VARIANTS)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    texts = {"wiki2-2nd-half": EVAL, **(eval_texts(args.eval) if args.eval else {})}
    if args.plot_only:
        data = json.loads(Path(args.out + ".json").read_text())
        plot(data["summary"], data["variants"], args.out + ".png")
        return
    scores = score(names, work, texts, args.windows, args.seq_len, args.threads)
    summary = summarise(scores, names)
    reports = {n: json.loads((work / f"{n}.report.json").read_text()) for n in names}
    sizes = {n: (work / f"{n}.gguf").stat().st_size / 2**20 for n in names}

    header = ["variant", "file MiB", "compress s", "peak RSS MiB"] + [
        c for t in texts for c in (f"ppl {t} (± se)", f"KL {t}", f"top-1 {t}")
    ]
    rows = [[f"`{n}`: {VARIANTS[n][0]}", f"{sizes[n]:.2f}", f"{reports[n]['compress_seconds']:.0f}",
             f"{reports[n]['peak_rss_mib']:.0f}"]
            + [c for t in texts for c in (f"{summary[t][n]['ppl']:.3f} ± {summary[t][n]['ppl_se']:.3f}",
                                          f"{summary[t][n]['kl']:.4f}", f"{100 * summary[t][n]['top1']:.1f}%")]
            for n in names]  # fmt: skip

    def cell(d) -> str:
        mean, lo, hi, lower, n = d
        return f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}], {lower}/{n}"

    pheader = ["variant"] + [c for t in texts for c in (f"{t}: ΔNLL", f"{t}: ΔKL")]
    prows = [[f"`{n}`"] + [c for t in texts for c in (cell(summary[t][n]["d_nll"]), cell(summary[t][n]["d_kl"]))]
             for n in names if n != REF]  # fmt: skip
    deciding = [t for t in ("wiki2-2nd-half", "lee-news") if t in texts]
    wins = [n for n in names if n != REF and all(summary[t][n]["d_nll"][0] < 0 and summary[t][n]["d_kl"][0] < 0
                                                 for t in deciding)]  # fmt: skip
    verdict = (
        f"Lower perplexity and lower KL than the shipped GPTQ on {' and '.join(deciding)}: "
        + (", ".join(f"`{n}`" for n in wins) if wins else "none")
        + "."
    )
    n_windows = ", ".join(f"{t}: {summary[t][REF]['windows']}" for t in texts)
    md = [
        "# GPTAQ (asymmetric calibration) vs the shipped GPTQ q4_0, run by llama.cpp",
        "",
        f"SmolLM2-135M-Instruct (bundled). Every row is `configs/gptq-q4_0.yaml` with GPTAQ's fields changed "
        "(`asymmetric`, `asym_alpha`, `asym_form`; `llmopt/kernels/gptaq.py`), calibrated on the same 32 x 512-token "
        "windows (seed 0) of the first half of `valid.nounk.txt`, exported with `--type auto` (q8_0 token "
        f"embedding, llama.cpp's tensor types for Q4_0) and scored by llama.cpp: {args.seq_len}-token windows "
        f"({n_windows}), KL against the F32 GGUF on the same tokens. Texts: "
        + ", ".join(f"`{t}` = {describe_text(s)}" for t, s in texts.items())
        + ". Compression seconds and peak RSS come from a machine shared with other jobs: indicative only.",
        "",
        markdown_table(header, rows),
        "",
        f"Paired with `{REF}`, window by window (variant minus `{REF}`; negative = the variant is better; 95% "
        "t-interval with windows as the unit; in how many windows the variant is lower):",
        "",
        markdown_table(pheader, prows),
        "",
        verdict,
        "",
        f"Machine: {machine_note()}. Produced by `python eval/bench_gptaq.py --windows {args.windows}"
        + "".join(f" --eval {e}" for e in args.eval or [])
        + (f" --variants {args.variants}" if args.variants != ",".join(VARIANTS) else "")
        + (f" --out {Path(args.out).relative_to(REPO)}" if Path(args.out).is_relative_to(REPO) else "")
        + "`.",
    ]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(
        json.dumps(
            {
                "variants": {n: VARIANTS[n][0] for n in names},
                "summary": summary,
                "reports": reports,
                "file_mib": sizes,
                "scores": scores,
            },
            indent=1,
        )  # fmt: skip
    )
    plot(summary, {n: VARIANTS[n][0] for n in names}, args.out + ".png")
    print("\n".join(md))


def plot(summary: dict, variants: dict, path: str) -> None:
    """Per text: each variant's paired ΔNLL and ΔKL against the shipped GPTQ, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(summary)
    names = [n for n in variants if n != REF]
    fig, axes = plt.subplots(2, len(texts), figsize=(5 * len(texts), 6), squeeze=False)
    for col, t in enumerate(texts):
        for row, (key, what) in enumerate((("d_nll", "ΔNLL (nats/token)"), ("d_kl", "ΔKL vs F32 (nats/token)"))):
            ax = axes[row][col]
            for y, n in enumerate(names):
                mean, lo, hi, _, _ = summary[t][n][key]
                ax.errorbar(mean, y, xerr=[[mean - lo], [hi - mean]], fmt="o", capsize=4)
            ax.axvline(0, color="k", lw=1)
            spans = [abs(v) for n in names for v in summary[t][n][key][:3]]
            if max(spans) > 20 * min(x for x in spans if x > 0):  # a diverging variant would hide the others
                ax.set_xscale("symlog", linthresh=0.01)  # linear within ±0.01 nats, logarithmic beyond
                lo, hi = (min(summary[t][n][key][1] for n in names), max(summary[t][n][key][2] for n in names))
                ax.set_xlim(min(lo * 3, -0.02), max(hi * 3, 0.02))  # room for the far points' whiskers
            ax.set_yticks(range(len(names)), names if col == 0 else [""] * len(names))
            ax.set_xlabel(f"{what}, variant − {REF}")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"{t} ({summary[t][REF]['windows']} windows)")
    fig.suptitle(
        "GPTAQ variants against the shipped GPTQ q4_0 (negative = better; 95% interval over windows;\n"
        "a symlog axis where one variant is far off: linear within ±0.01)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
