"""llmopt vs llm-compressor 0.14 on the same model, scheme and calibration token ids.

1. writes llmopt's calibration windows (32 x 512, seed 0, first half of valid.nounk.txt) to a file;
2. runs ``eval/llmcompressor_baseline.py`` with llm-compressor's own environment (``--llmc-python``,
   see that script's docstring for how it is made) for each method;
3. runs llmopt's shipped config for the same scheme (``configs/<method>.yaml``) right after it, in the
   same run, on the same calibration windows;
4. scores both with llmopt's evaluation (2048-token windows of every ``--eval`` text, default the second
   half of valid.nounk.txt; KL vs the dense model). Writes eval/results/llmcompressor.md.

    python eval/bench_llmcompressor.py --llmc-python /work/llmc-venv/bin/python [--methods gptq-w4g64,gptq-w3g64] \
        [--eval wiki2=text:../shared/data/wikitext-2/valid.nounk.txt#0.5:1 --eval lee]

``--layerwise``: the kernels alone, on the same Hessians. Dense-model Hessians (the same calibration
windows) of the Linears of a few decoder layers are saved once; llm-compressor's GPTQ function
(``llmcompressor_baseline.py --hessians``) and llmopt's ``gptq_quantize`` in several settings quantize
the very same (W, H) pairs, and every result is scored by the layer objective tr((W − Ŵ) H (W − Ŵ)ᵀ)
relative to RTN. Writes eval/results/gptq-layerwise-w<bits>.md (and .json), with kernel seconds::

    python eval/bench_llmcompressor.py --llmc-python /work/llmc-venv/bin/python --layerwise --bits 3
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CALIB,
    MODEL,
    REPO,
    CachedBackend,
    cleanup,
    describe_text,
    eval_texts,
    evaluate_folder,
    fmt,
    machine_note,
    markdown_table,
    run_compress,
)

# llm-compressor method → the shipped llmopt config run next to it in the same process, same calibration ids
_CAL = {"data": "wikitext2", "samples": 32, "seq_len": 512, "seed": 0}
# plain GPTQ spelled out (the gptq stage defaults to act-order + static groups + search + sink weight)
_INT = {"stage": "gptq", "format": "int", "group_size": 64, "symmetric": True, "act_order": False,
        "static_groups": False, "mse_grid": 0, "sink_weight": 0.0}  # fmt: skip
# the shipped int setting with the plain Hessian (no extra weight on each window's first token in v_proj)
_SHIPPED_NO_SINK = {"act_order": True, "static_groups": True, "mse_grid": 20}
# --with-variants: other llmopt settings run in the same process (evidence for the shipped choice)
LLMOPT_VARIANTS = {
    "gptq-w3g64": [
        ("llmopt int3, dynamic groups + search", {"calibration": _CAL, "stages": [_INT | {"bits": 3, "mse_grid": 20}]}),
        (
            "llmopt int3, shipped but sink_weight 0",
            {"calibration": _CAL, "stages": [_INT | _SHIPPED_NO_SINK | {"bits": 3}]},
        ),
    ],
    "gptq-w4g64": [
        (
            "llmopt int4, act-order + static groups, no search",
            {"calibration": _CAL, "stages": [_INT | {"bits": 4, "act_order": True, "static_groups": True}]},
        ),
        (
            "llmopt int4, shipped but sink_weight 0",
            {"calibration": _CAL, "stages": [_INT | _SHIPPED_NO_SINK | {"bits": 4}]},
        ),
    ],
}
LLMOPT_CONFIG = {
    "gptq-w4g64": "configs/gptq-w4g64.yaml",
    "gptq-w4g32": "configs/gptq-w4g32.yaml",
    "gptq-w8": "configs/gptq-w8.yaml",
    "gptq-w3g64": "configs/gptq-w3g64.yaml",
    "sparsegpt-50": "configs/sparsegpt-50.yaml",
    "sparsegpt-2of4": "configs/sparsegpt-2of4.yaml",
}


# --timing: shipped llmopt configs without a scheme of the same name in llm-compressor, timed beside the
# nearest one (q4_0 = 4-bit symmetric blocks of 32 columns with an fp16 scale, llm-compressor's int4 g32 sym)
# (q8_0: 8-bit symmetric blocks of 32; q4_1: 4-bit blocks of 32 with a min, llm-compressor's asymmetric int4 g32)
TIMING_BASELINE = {"gptq-q4_0": "gptq-w4g32", "gptq-q8_0": "gptq-w8g32", "gptq-q4_1": "gptq-w4g32-asym"}

# GPTQConfig's shipped defaults are act-order + static groups + search; the variants below start from the paper's
PAPER = dict(act_order=False, static_groups=False, mse_grid=0)
LAYERWISE_VARIANTS = {
    # label: GPTQConfig fields (int b g64 sym)
    "llmopt, llm-compressor's setting (act-order + static groups)": dict(act_order=True, static_groups=True),
    "llmopt, dynamic groups (paper)": dict(),
    "llmopt, static groups": dict(static_groups=True),
    "llmopt, dynamic groups + H-weighted search": dict(mse_grid=20),
    "llmopt, static groups + H-weighted search": dict(static_groups=True, mse_grid=20),
    "llmopt, act-order + static groups + H-weighted search": dict(act_order=True, static_groups=True, mse_grid=20),
}


def save_hessians(path: Path, layers: list[int]) -> None:
    """Dense-model Hessians H = 2/N Σ xᵀx (32 x 512 calibration windows, seed 0), as the engine
    accumulates them, and weights of every Linear of decoder ``layers``: one forward of the dense model
    with pre-hooks (the engine's layer-by-layer pass gives the same H for a dense model)."""
    from llmopt.calibration import find_decoder_layers
    from llmopt.data import calibration_windows
    from llmopt.models import load_model, load_tokenizer

    model = load_model(MODEL).model.float().eval()
    windows = calibration_windows(CALIB, load_tokenizer(MODEL), 32, 512, seed=0)
    prefix, decoder = find_decoder_layers(model)
    acc: dict[str, list] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            H, n = acc.setdefault(name, [torch.zeros(x.shape[1], x.shape[1]), 0])
            H.mul_(n / (n + x.shape[0])).addmm_(x.t(), x, alpha=2.0 / (n + x.shape[0]))
            acc[name][1] = n + x.shape[0]

        return fn

    handles = [
        m.register_forward_pre_hook(hook(f"{prefix}.{i}.{n}"))
        for i in layers
        for n, m in decoder[i].named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        for b in range(0, windows.shape[0], 8):
            model(windows[b : b + 8], use_cache=False)
    for h in handles:
        h.remove()
    pairs = {n: {"W": model.get_submodule(n).weight.detach().float().clone(), "H": H} for n, (H, _) in acc.items()}
    torch.save(pairs, path)


def layerwise(args) -> None:
    import time

    from llmopt.formats import IntFormat, rtn_quantize
    from llmopt.kernels.gptq import GPTQConfig, gptq_quantize
    from llmopt.kernels.hessian import weighted_error

    work = Path(args.reuse or tempfile.mkdtemp(prefix="bench-llmc-layers-"))
    work.mkdir(parents=True, exist_ok=True)
    hpath = work / "hessians.pt"
    layers = [int(x) for x in args.layers.split(",")]
    if not hpath.exists():
        save_hessians(hpath, layers)
    pairs = torch.load(hpath, weights_only=True)
    fmt_ = IntFormat(args.bits, 64, True)
    results: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for actorder, label in (("weight", "llm-compressor 0.14 GPTQ (act-order weight, static minmax scales)"),
                            ("none", "llm-compressor 0.14 GPTQ, actorder=None")):  # fmt: skip
        qpath = work / f"llmc_w{args.bits}_{actorder}.pt"
        cmd = [args.llmc_python, str(REPO / "eval" / "llmcompressor_baseline.py"), "--hessians", str(hpath),
               "--bits", str(args.bits), "--group-size", "64", "--actorder", actorder,
               "--output", str(qpath)]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, check=True)
        seconds[label] = json.loads(p.stdout.strip().splitlines()[-1])["seconds"]
        Q = torch.load(qpath, weights_only=True)
        results[label] = {n: weighted_error(d["W"], Q[n], d["H"]) for n, d in pairs.items()}
    rtn = {n: rtn_quantize(d["W"], fmt_, H=d["H"]).loss for n, d in pairs.items()}
    for label, kw in LAYERWISE_VARIANTS.items():
        t0 = time.perf_counter()
        results[label] = {
            n: gptq_quantize(d["W"], d["H"], fmt_, GPTQConfig(**{**PAPER, **kw}), name=n).loss for n, d in pairs.items()
        }
        seconds[label] = time.perf_counter() - t0
    # per Linear type (q/k/v/o/gate/up/down) and overall: geometric mean of loss / RTN loss
    kinds = sorted(
        {n.rsplit(".", 1)[-1] for n in pairs}, key=lambda k: list(pairs).index(next(n for n in pairs if n.endswith(k)))
    )
    header = ["kernel", *kinds, "all (geo-mean loss / RTN)", "wins vs llm-compressor", "kernel s"]
    ref = results["llm-compressor 0.14 GPTQ (act-order weight, static minmax scales)"]
    rows = []

    def gm(res: dict[str, float], names: list[str]) -> float:
        return math.exp(sum(math.log(res[n] / rtn[n]) for n in names) / len(names))

    for label, res in results.items():
        cells = [fmt(gm(res, [n for n in pairs if n.endswith("." + k)]), 3) for k in kinds]
        wins = sum(res[n] < ref[n] for n in pairs)
        rows.append([label, *cells, fmt(gm(res, list(pairs)), 3), f"{wins}/{len(pairs)}", fmt(seconds[label], 1)])
    md = [
        f"# GPTQ kernels layer by layer: int{args.bits} g64 sym, llmopt vs llm-compressor 0.14 on the same Hessians",
        "",
        f"SmolLM2-135M-Instruct (bundled), decoder layers {args.layers}: {len(pairs)} Linears. Hessians of the DENSE "
        "model from the same 32 x 512 calibration windows (seed 0, first half of `valid.nounk.txt`), saved once "
        "and fed to both kernels. Cells: geometric mean over the Linears of that kind of the layer objective "
        "tr((W − Ŵ) H (W − Ŵ)ᵀ) divided by RTN's (minmax scales) - lower is better; damp 0.01, block 128 "
        "everywhere. 'wins': Linears where the kernel's objective is below llm-compressor's default.",
        "",
        markdown_table(header, rows),
        "",
        f"Machine: {machine_note()}. Produced by `python eval/bench_llmcompressor.py --layerwise --bits {args.bits}`.",
    ]
    out = REPO / "eval" / "results" / f"gptq-layerwise-w{args.bits}"
    Path(str(out) + ".md").write_text("\n".join(md) + "\n")
    Path(str(out) + ".json").write_text(json.dumps({"rtn": rtn, "results": results, "seconds": seconds}, indent=1))
    print("\n".join(md))


def _timing_config(method: str) -> str:
    return LLMOPT_CONFIG.get(method) or f"configs/{method}.yaml"


def timing(args) -> None:
    """``--timing``: compression seconds only, llm-compressor and llmopt's shipped config alternating
    (llm-compressor, llmopt, llm-compressor, llmopt, ...) ``--repeats`` times per method on the same
    calibration ids, nothing else running; medians with min/max. Writes <out>-timing.{md,json}."""
    import statistics

    from llmopt.data import calibration_windows
    from llmopt.models import load_tokenizer, resolve_local_folder

    work = Path(tempfile.mkdtemp(prefix="bench-llmc-timing-"))
    ids = work / "calib_32x512.pt"
    torch.save(calibration_windows(CALIB, load_tokenizer(MODEL), 32, 512, seed=0), ids)
    model_dir = resolve_local_folder(MODEL)
    times: dict[str, dict[str, list[float]]] = {}
    for method in args.methods.split(","):
        t = times.setdefault(method, {"llm-compressor": [], "llmopt": []})
        for _ in range(args.repeats):
            out, scheme = work / method, TIMING_BASELINE.get(method, method)
            cmd = [args.llmc_python, str(REPO / "eval" / "llmcompressor_baseline.py"), "--model-dir", model_dir,
                   "--calib-ids", str(ids), "--method", scheme, "--output", str(out)]  # fmt: skip
            p = subprocess.run(cmd, capture_output=True, text=True, check=True)
            t["llm-compressor"].append(json.loads(p.stdout.strip().splitlines()[-1])["oneshot_seconds"])
            cleanup(out)
            folder = work / f"llmopt-{method}"
            t["llmopt"].append(run_compress(str(REPO / _timing_config(method)), folder)["compress_seconds"])
            cleanup(folder)
            print(method, {k: v[-1] for k, v in t.items()}, flush=True)
    header = ["llmopt config", "llm-compressor 0.14 `oneshot()` s (scheme)", "llmopt shipped config s",
              "llmopt / llm-compressor"]  # fmt: skip
    rows = []
    for method, t in times.items():
        a, b = statistics.median(t["llm-compressor"]), statistics.median(t["llmopt"])
        span = lambda v: f"{statistics.median(v):.1f} [{min(v):.1f}, {max(v):.1f}]"  # noqa: E731
        rows.append([method, f"{span(t['llm-compressor'])} ({TIMING_BASELINE.get(method, method)})",
                     f"{span(t['llmopt'])} (`{_timing_config(method)}`)",
                     f"{b / a:.2f}x"])  # fmt: skip
    md = [
        "# Compression time: llmopt's shipped GPTQ configs vs llm-compressor 0.14, same run",
        "",
        f"SmolLM2-135M-Instruct (bundled), the identical 32 x 512 calibration ids (seed 0). Each method ran "
        f"{args.repeats} times, the two tools alternating, one compression at a time (other jobs on the machine, "
        "if any, ran at nice 19); "
        "median [min, max] seconds. llm-compressor: its `oneshot()` call (model load and save excluded); "
        "llmopt: the layer-wise engine's `compress_seconds` (model load and save excluded).",
        "",
        markdown_table(header, rows),
        "",
        f"Machine: {machine_note()}. Produced by `python eval/bench_llmcompressor.py --llmc-python PY --timing "
        f"--methods {args.methods} --repeats {args.repeats}`.",
    ]
    Path(args.out + "-timing.md").write_text("\n".join(md) + "\n")
    Path(args.out + "-timing.json").write_text(json.dumps(times, indent=1))
    print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llmc-python", required=True, help="python of the llm-compressor virtual environment")
    ap.add_argument("--methods", default="gptq-w4g64,gptq-w3g64")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--eval", action="append", help="NAME=DATA_SPEC evaluation text (repeatable); 'lee' = Lee news")
    ap.add_argument("--reuse", default=None, help="folder with <method>/ outputs and <method>.json of earlier runs")
    ap.add_argument("--out", default=str(REPO / "eval" / "results" / "llmcompressor"))
    ap.add_argument("--layerwise", action="store_true", help="kernels only, on saved Hessians (see docstring)")
    ap.add_argument("--bits", type=int, default=3, help="--layerwise: int bits")
    ap.add_argument("--layers", default="0,7,15,23,29", help="--layerwise: decoder layers whose Linears are used")
    ap.add_argument("--with-variants", action="store_true", help="also run LLMOPT_VARIANTS in the same run")
    ap.add_argument("--timing", action="store_true", help="compression seconds only, alternating, --repeats times")
    ap.add_argument("--repeats", type=int, default=2, help="--timing: runs per tool and method")
    args = ap.parse_args()
    if args.timing:
        timing(args)
        return
    if args.layerwise:
        layerwise(args)
        return

    from llmopt.backends.torch_backend import TorchBackend
    from llmopt.data import calibration_windows
    from llmopt.models import load_tokenizer, resolve_local_folder

    texts = eval_texts(args.eval)
    work = Path(args.reuse or tempfile.mkdtemp(prefix="bench-llmc-"))
    work.mkdir(parents=True, exist_ok=True)
    ids = work / "calib_32x512.pt"
    torch.save(calibration_windows(CALIB, load_tokenizer(MODEL), 32, 512, seed=0), ids)
    model_dir = resolve_local_folder(MODEL)
    dense = CachedBackend(TorchBackend.from_spec(MODEL))
    dense_ppl = {n: evaluate_folder(dense, None, 2048, args.windows, data=spec).perplexity for n, spec in texts.items()}
    rows, records = [], []

    def add(method: str, tool: str, folder: Path, seconds: float, rss_mib: float) -> None:
        rec = dict(method=method, tool=tool, seconds=seconds, peak_rss_mib=rss_mib, texts={})
        cells = [method, tool]
        for name, spec in texts.items():
            r = evaluate_folder(str(folder), dense, 2048, args.windows, data=spec)
            rec["texts"][name] = dict(ppl=r.perplexity, kl_mean=r.kl.mean, top1=r.kl.top1_agreement)
            cells += [fmt(r.perplexity, 3), fmt(r.kl.mean, 4)]
        rows.append(cells + [fmt(seconds, 1), fmt(rss_mib / 1024, 2)])
        records.append(rec)
        print(rows[-1], flush=True)

    for method in args.methods.split(","):
        out, meta = work / method, work / f"{method}.json"
        if not meta.exists():
            cmd = [args.llmc_python, str(REPO / "eval" / "llmcompressor_baseline.py"), "--model-dir", model_dir,
                   "--calib-ids", str(ids), "--method", method, "--output", str(out)]  # fmt: skip
            p = subprocess.run(cmd, capture_output=True, text=True, check=True)
            meta.write_text(p.stdout.strip().splitlines()[-1])
        info = json.loads(meta.read_text())
        add(method, "llm-compressor 0.14 (defaults)", out, info["oneshot_seconds"], info["peak_rss_mib"])
        config = LLMOPT_CONFIG.get(method)
        if config:
            folder = work / f"llmopt-{method}"
            rep = run_compress(str(REPO / config), folder)
            add(method, f"llmopt `{config}` (shipped)", folder, rep["compress_seconds"], rep["peak_rss_mib"])
            cleanup(folder)
        for label, recipe in LLMOPT_VARIANTS.get(method, []) if args.with_variants else []:
            folder = work / f"llmopt-variant-{method}"
            rep = run_compress(recipe, folder)
            add(method, label, folder, rep["compress_seconds"], rep["peak_rss_mib"])
            cleanup(folder)
        Path(args.out + ".partial.json").write_text(json.dumps({"dense_ppl": dense_ppl, "rows": records}, indent=1))

    header = ["method", "tool"]
    for name in texts:
        header += [f"ppl {name}", f"KL {name}"]
    header += ["seconds", "peak RSS GiB"]
    dense_txt = ", ".join(f"{n} {p:.3f}" for n, p in dense_ppl.items())
    texts_txt = "; ".join(f"`{n}` = {describe_text(s)}" for n, s in texts.items())
    md = [
        "# llmopt vs llm-compressor 0.14 (same model, scheme and calibration ids, one run)",
        "",
        f"SmolLM2-135M-Instruct (bundled). Dense perplexity {dense_txt} on {args.windows} x 2048 tokens per text "
        f"({texts_txt}); both tools calibrated on the identical 32 x 512 token windows (seed 0) of the first half "
        "of `valid.nounk.txt`. llm-compressor runs its defaults (GPTQ: act-order 'static', group scales from "
        "the original weights by its min-max observer, damp 0.01; symmetric int groups of 64) in its own "
        "environment (transformers 5.17); llmopt runs its shipped config. Both were run one after the other "
        "by this script on the same machine. Seconds: the `oneshot()` call vs llmopt's layer-wise engine "
        "(model load and save excluded on both sides).",
        "",
        markdown_table(header, rows),
        "",
        f"Machine: {machine_note()}. Produced by `python eval/bench_llmcompressor.py --llmc-python PY "
        f"--methods {args.methods}"
        + (" --with-variants" if args.with_variants else "")
        + "".join(f" --eval {e.replace(str(REPO.parent), '..')}" for e in args.eval or [])
        + "`.",
    ]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"dense_ppl": dense_ppl, "rows": records}, indent=1))
    Path(args.out + ".partial.json").unlink(missing_ok=True)
    print("\n".join(md))


if __name__ == "__main__":
    main()
