"""GPTQ q4_0 variants vs llama.cpp Q4_0 + imatrix on two texts, run by llama.cpp: a screening benchmark.

Every variant is compressed by ``llmopt compress`` (one at a time), exported to GGUF (q8_0 token embedding,
as llama.cpp's file) and scored window by window by llama.cpp on the first ``--lee`` windows of the Lee news
text and the first ``--wiki`` windows of the second half of ``valid.nounk.txt`` (2048 tokens each). Each
variant is compared, window by window, with the shipped config and with llama.cpp's Q4_0 + imatrix built
from the SAME calibration windows as the variant (a variant that changes the calibration gets its own
imatrix row). Per-window NLLs are cached in ``--work`` so an interrupted run resumes; ``--seed-from`` takes
the shipped and imatrix rows' per-window NLLs from a ``bench_gguf_paired.py`` JSON (the same files, the
same first windows) instead of recomputing them. No KL here (no F32 pass): this ranks candidates on
perplexity, the one measure where the shipped config did not yet win; ``bench_gguf_paired.py`` confirms.

    python eval/bench_q4_0_variants.py [--lee 16 --wiki 8] [--seed-from eval/results/gguf-q4_0-paired.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gguf import EMB  # noqa: E402
from common import CALIB, EVAL, LEE, MODEL, REPO, cleanup, machine_note, markdown_table, paired_diff, run_compress  # noqa: E402

# The gptq-q4_0 setting the seeded `shipped` row was made with (before `mixture` and `sink_weight` existed):
# every variant starts from it, so each row changes one thing.
SHIPPED = {"act_order": True, "static_groups": True, "mse_grid": 20, "mixture": "none", "sink_weight": 0.0}
# name: (description, gptq stage overrides, calibration (samples, seq_len, true_sequential))
VARIANTS = {
    "shipped": ("gptq-q4_0 as shipped before `mixture` / `sink_weight` (act-order, static groups, search)", {},
                (32, 512, False)),
    "nosearch": ("no scale search (mse_grid 0)", {"mse_grid": 0}, (32, 512, False)),
    "imw": ("search weighted as llama.cpp's imatrix: diag H · sqrt(σ² + w²)", {"search_weight": "imatrix"},
            (32, 512, False)),
    "damp01": ("damp 0.1 (10x)", {"damp": 0.1}, (32, 512, False)),
    "tseq": ("true_sequential calibration", {}, (32, 512, True)),
    "refit": ("refit scales for GPTQ's codes under the full layer objective", {"refit": True}, (32, 512, False)),
    "s2048": ("calibration 8 x 2048 (same tokens, 4x fewer windows)", {}, (8, 2048, False)),
    "c128": ("calibration 128 x 512 (4x the windows)", {}, (128, 512, False)),
    "mix": ("llama.cpp's tensor types: first n_layer/8 ffn_down in q4_1 (`mixture: llama.cpp`)",
            {"mixture": "llama.cpp"}, (32, 512, False)),
    "sink": ("first token of each window weighted 1.0 in v_proj's Hessian (`sink_weight: 1.0`)",
             {"sink_weight": 1.0}, (32, 512, False)),
    "mixsink": ("`mixture: llama.cpp` + `sink_weight: 1.0`", {"mixture": "llama.cpp", "sink_weight": 1.0},
                (32, 512, False)),
    "mixsink05": ("`mixture: llama.cpp` + `sink_weight: 0.5`", {"mixture": "llama.cpp", "sink_weight": 0.5},
                  (32, 512, False)),
    "mixsink2": ("`mixture: llama.cpp` + `sink_weight: 2.0`", {"mixture": "llama.cpp", "sink_weight": 2.0},
                 (32, 512, False)),
}  # fmt: skip
SEEDED = {"shipped": "llmopt GPTQ q4_0 (shipped gptq-q4_0)", "imatrix": "llama.cpp Q4_0 + imatrix"}


def imatrix_name(calib: tuple[int, int, bool]) -> str:
    samples, seq_len, _ = calib
    return "imatrix" if (samples, seq_len) == (32, 512) else f"imatrix-{samples}x{seq_len}"


def build(name: str, work: Path) -> Path:
    from llmopt.exporters import export_gguf

    path = work / f"{name}.gguf"
    if path.exists():
        return path
    tmp = work / f"{name}.partial.gguf"
    if name.startswith("imatrix"):
        samples, seq_len = (32, 512) if name == "imatrix" else map(int, name.split("-")[1].split("x"))
        export_gguf(MODEL, str(tmp), type="q4_0", embedding_type=EMB, imatrix=CALIB, imatrix_samples=samples,
                    imatrix_seq_len=seq_len, threads=2)  # fmt: skip
    else:
        _, stage, (samples, seq_len, tseq) = VARIANTS[name]
        folder = work / f"{name}-folder"
        recipe = {
            "name": f"gptq-q4_0-{name}",
            "calibration": {"data": "wikitext2", "samples": samples, "seq_len": seq_len, "seed": 0,
                            "true_sequential": tseq},
            "stages": [{"stage": "gptq", "format": "q4_0", **SHIPPED, **stage}],
        }  # fmt: skip
        rep = run_compress(recipe, folder)
        (work / f"{name}.seconds").write_text(str(rep["compress_seconds"]))
        export_gguf(str(folder), str(tmp), type="auto", embedding_type=EMB)
        cleanup(folder)
    tmp.rename(path)
    return path


def score(name: str, work: Path, texts: dict[str, tuple[str, int]], tok) -> dict[str, list[float]]:
    from llmopt.backends.llamacpp_backend import LlamaCppBackend
    from llmopt.data import evaluation_tokens
    from llmopt.metrics import make_windows

    cache = work / f"{name}.json"
    res = json.loads(cache.read_text()) if cache.exists() else {}
    if all(len(res.get(t, [])) >= n for t, (_, n) in texts.items()):
        return res
    be = LlamaCppBackend(str(build(name, work)), threads=2)
    for t, (spec, n) in texts.items():
        have = res.setdefault(t, [])
        if len(have) >= n:
            continue
        windows = make_windows(evaluation_tokens(spec, tok), 2048, n)
        for w in windows[len(have) :]:
            logp = F.log_softmax(be.logits(w)[:-1].float(), -1)
            have.append(float(-logp.gather(1, w[1:, None]).double().mean()))
            cache.write_text(json.dumps(res))
    be.close()
    return res


TEMPS = (0.95, 1.05, 1.1, 1.2)


def confidence(work: Path, names: list[str], texts: dict[str, tuple[str, int]], tok, n_windows: int) -> dict:
    """Per text and file (F32 + ``names``) on the first ``n_windows`` windows, per token: NLL, predictive
    entropy, KL vs F32, and the NLL with the logits divided by T (a model whose entropy is below its NLL
    is overconfident on that text; flattening its distribution then costs less perplexity per unit KL).
    Cached in ``work``/confidence.json."""
    from llmopt.backends.llamacpp_backend import LlamaCppBackend
    from llmopt.data import evaluation_tokens
    from llmopt.exporters import export_gguf
    from llmopt.metrics import make_windows

    cache = work / "confidence.json"
    if cache.exists():
        return json.loads(cache.read_text())
    f32 = work / "f32.gguf"
    if not f32.exists():
        export_gguf(MODEL, str(f32), type="f32")
    bes = {"F32": LlamaCppBackend(str(f32), threads=2)}
    bes.update({n: LlamaCppBackend(str(build(n, work)), threads=2) for n in names})
    out: dict = {}
    for t, (spec, _) in texts.items():
        acc = {k: dict(nll=0.0, entropy=0.0, kl=0.0, tokens=0, **{f"nll_T{T}": 0.0 for T in TEMPS}) for k in bes}
        for w in make_windows(evaluation_tokens(spec, tok), 2048, n_windows):
            y = w[1:, None]
            ref = F.log_softmax(bes["F32"].logits(w)[:-1].float(), -1)
            for k, be in bes.items():
                logits = be.logits(w)[:-1].float()
                lp = F.log_softmax(logits, -1)
                a = acc[k]
                a["nll"] += float(-lp.gather(1, y).sum())
                a["entropy"] += float(-(lp.exp() * lp).sum())
                a["kl"] += float((ref.exp() * (ref - lp)).sum())
                a["tokens"] += len(y)
                for T in TEMPS:
                    a[f"nll_T{T}"] += float(-F.log_softmax(logits / T, -1).gather(1, y).sum())
        out[t] = {k: {m: v / a["tokens"] if m != "tokens" else v for m, v in a.items()} for k, a in acc.items()}
    for be in bes.values():
        be.close()
    cache.write_text(json.dumps(out))
    return out


def sink_attention(tok, windows: int = 4, seq_len: int = 512, skip: int = 64) -> list[float]:
    """Per decoder layer of the F32 model: the mean attention weight that queries past position ``skip`` put on
    their window's first token (calibration windows, no BOS). Near 1/position for an ordinary token; the
    attention sink takes a large share: the evidence behind ``sink_weight``."""
    import torch

    from llmopt.data import calibration_windows
    from llmopt.models import load_model

    model = load_model(MODEL, dtype=torch.float32).model
    model.config._attn_implementation = "eager"  # returns the attention weights
    ids = calibration_windows(CALIB, tok, windows, seq_len, seed=0)
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    return [float(a[..., skip:, 0].mean()) for a in att]  # a: (windows, heads, queries, keys)


def paired(a: list[float], b: list[float]) -> str:
    mean, lo, hi, lower, n = paired_diff(a, b)
    return f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}], {lower}/{n}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lee", type=int, default=16, help="windows of the Lee news text")
    ap.add_argument("--wiki", type=int, default=8, help="windows of the second half of valid.nounk.txt")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    ap.add_argument("--work", default="/tmp/bench-q4_0-variants", help="GGUF files and per-window NLL cache")
    ap.add_argument("--seed-from", help="bench_gguf_paired.py JSON with the shipped and imatrix rows")
    ap.add_argument(
        "--confidence",
        default="c128,imatrix-128x512",
        help="files whose entropy / temperature response is compared with F32 ('' = skip)",
    )
    ap.add_argument("--confidence-windows", type=int, default=4)
    ap.add_argument("--out", default=str(REPO / "eval" / "results" / "gguf-q4_0-variants"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    texts = {"lee-news": (f"text:{LEE}", args.lee), "wiki2-2nd-half": (EVAL, args.wiki)}
    if args.seed_from:
        rows = {r["label"]: r for r in json.loads(Path(args.seed_from).read_text())["rows"]}
        for name, label in SEEDED.items():
            if not (work / f"{name}.json").exists():
                seeded = {t: rows[label]["texts"][t]["window_nll"] for t in texts}
                (work / f"{name}.json").write_text(json.dumps(seeded))
                (work / f"{name}.seconds").write_text(str(rows[label]["quantize_seconds"]))
                (work / f"{name}.mib").write_text(str(rows[label]["file_mib"]))

    from llmopt.models import load_tokenizer

    tok = load_tokenizer(MODEL)
    names = args.variants.split(",")
    refs = sorted({imatrix_name(VARIANTS[n][2]) for n in names}, key=len)
    nll = {n: score(n, work, texts, tok) for n in refs + names}
    cut = {n: {t: v[t][: texts[t][1]] for t in texts} for n, v in nll.items()}

    def ppl(x: list[float]) -> str:
        return f"{math.exp(sum(x) / len(x)):.3f}"

    def mib(name: str) -> str:
        """The GGUF file's size: built here, or as recorded with the seeded row."""
        f, seeded = work / f"{name}.gguf", work / f"{name}.mib"
        return f"{(f.stat().st_size if f.exists() else float(seeded.read_text()) * 2**20) / 2**20:.2f}"

    header = ["variant", "calibration", "file MiB", "compress s"] + [
        c for t in texts for c in (f"ppl {t}", f"{t}: ΔNLL vs imatrix, same calibration [95%], windows lower",
                                   f"{t}: ΔNLL vs shipped")
    ]  # fmt: skip
    rows = []
    for r in refs:
        rows.append([f"llama.cpp Q4_0 + {r}", r.replace("imatrix-", "").replace("imatrix", "32x512"), mib(r), "—"]
                    + [c for t in texts for c in (ppl(cut[r][t]), "—", "—")])  # fmt: skip
    for n in names:
        desc, _, calib = VARIANTS[n]
        secs = work / f"{n}.seconds"
        ref = imatrix_name(calib)
        vs_shipped = {t: "—" if n == "shipped" else paired(cut[n][t], cut["shipped"][t]) for t in texts}
        rows.append([f"`{n}`: {desc}", f"{calib[0]}x{calib[1]}" + (" true-seq" if calib[2] else ""), mib(n),
                     f"{float(secs.read_text()):.0f}" if secs.exists() else "?"]
                    + [c for t in texts for c in (ppl(cut[n][t]), paired(cut[n][t], cut[ref][t]),
                                                  vs_shipped[t])])  # fmt: skip
    conf = {}
    if args.confidence:
        conf = confidence(work, args.confidence.split(","), texts, tok, args.confidence_windows)
    conf_md = []
    if conf:
        conf_md = [
            "",
            f"## Confidence: entropy against NLL (first {args.confidence_windows} windows of each text, per token)",
            "",
            "Predictive entropy below the NLL = overconfident on that text. `NLL at T`: logits divided by T.",
            "",
            markdown_table(
                ["text", "file", "NLL", "entropy", "KL vs F32"] + [f"NLL at T={T}" for T in TEMPS],
                [[t, k, f"{v['nll']:.4f}", f"{v['entropy']:.4f}", f"{v['kl']:.4f}"]
                 + [f"{v[f'nll_T{T}']:.4f}" for T in TEMPS] for t, per in conf.items() for k, v in per.items()],
            ),
        ]  # fmt: skip
    sink = sink_attention(tok)
    sink_md = [
        "",
        "## Attention on each window's first token (F32, 4 calibration windows of 512 tokens)",
        "",
        "Mean attention weight that queries past position 64 put on their window's first token, per decoder "
        "layer (an ordinary token would get about 1/300):",
        "",
        markdown_table([f"{i}" for i in range(len(sink))], [[f"{x:.2f}" for x in sink]]),
    ]
    md = [
        "# GPTQ q4_0 variants vs llama.cpp Q4_0 + imatrix (screening, run by llama.cpp)",
        "",
        f"SmolLM2-135M-Instruct (bundled). First {args.lee} windows of the Lee news text and first {args.wiki} "
        "of the second half of `valid.nounk.txt`, 2048 tokens each, scored by llama.cpp; calibration windows "
        "from the first half of `valid.nounk.txt` (seed 0), the imatrix row a variant is paired with uses the "
        "same windows. ΔNLL: mean per-window NLL difference (negative = the variant is better), 95% t-interval "
        "over windows, and in how many windows the variant is lower. Perplexity only (no KL): see "
        "`gguf-q4_0-paired.md` for KL."
        + (
            " The `shipped` and `imatrix` rows' per-window NLLs (and the shipped row's compression seconds, "
            f"from another session) come from `{Path(args.seed_from).name}` (the same files and windows, scored "
            "by `bench_gguf_paired.py`)."
            if args.seed_from
            else ""
        ),
        "",
        markdown_table(header, rows),
        *sink_md,
        *conf_md,
        "",
        f"Machine: {machine_note()}. Produced by `python eval/bench_q4_0_variants.py --lee {args.lee} --wiki "
        f"{args.wiki}"
        + (f" --variants {args.variants}" if args.variants != ",".join(VARIANTS) else "")
        + (f" --confidence {args.confidence}" if args.confidence else " --confidence ''")
        + (" --seed-from OLD_PAIRED (see gptq-defaults.md, Reproduce)" if args.seed_from else "")
        + (f" --out {Path(args.out).relative_to(REPO)}" if Path(args.out).is_relative_to(REPO) else "")
        + "`.",
    ]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(
        json.dumps({"texts": {t: n for t, (_, n) in texts.items()}, "nll": nll, "confidence": conf, "sink": sink})
    )
    print("\n".join(md))


if __name__ == "__main__":
    main()
