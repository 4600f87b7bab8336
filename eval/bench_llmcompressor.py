"""llmopt vs llm-compressor 0.14 on the same model, scheme and calibration token ids.

1. writes llmopt's calibration windows (32 x 512, seed 0, first half of valid.nounk.txt) to a file;
2. runs ``eval/llmcompressor_baseline.py`` with llm-compressor's own environment (``--llmc-python``,
   see that script's docstring for how it is made) for each method;
3. scores its output with llmopt's evaluation (second half, 2048-token windows, KL vs the dense model)
   and puts it next to llmopt's row for the same scheme from ``results/quant.json`` /
   ``results/pruning.json`` (produced by bench_quant.py / bench_pruning.py on the same windows).
Writes eval/results/llmcompressor.md.

    python eval/bench_llmcompressor.py --llmc-python /work/llmc-venv/bin/python [--methods gptq-w4g64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CALIB, MODEL, REPO, CachedBackend, evaluate_folder, fmt, machine_note, markdown_table  # noqa: E402

# llm-compressor method → llmopt rows to show next to it: (label, result file, row selector)
LLMOPT_ROWS = {
    "gptq-w4g64": [
        ("llmopt, act-order + static groups (llm-compressor's setting)", "quant-variants.json",
         lambda r: r["scheme"] == "int4 g64 sym, act-order + static groups"),
        ("llmopt, default (no act-order)", "quant.json",
         lambda r: r["scheme"] == "int4 g64 sym" and r["method"] == "GPTQ"),
    ],
    "gptq-w3g64": [("llmopt", "quant.json", lambda r: r["scheme"] == "int3 g64 sym" and r["method"] == "GPTQ")],
    "sparsegpt-50": [("llmopt", "pruning.json", lambda r: r["method"] == "sparsegpt" and r["pattern"] == "50%")],
    "sparsegpt-2of4": [("llmopt", "pruning.json", lambda r: r["method"] == "sparsegpt" and r["pattern"] == "2:4")],
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llmc-python", required=True, help="python of the llm-compressor virtual environment")
    ap.add_argument("--methods", default="gptq-w4g64")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--reuse", default=None, help="folder with <method>/ outputs and <method>.json of earlier runs")
    ap.add_argument("--out", default=str(REPO / "eval" / "results" / "llmcompressor"))
    args = ap.parse_args()

    import torch

    from llmopt.backends.torch_backend import TorchBackend
    from llmopt.data import calibration_windows
    from llmopt.models import load_tokenizer, resolve_local_folder

    work = Path(args.reuse or tempfile.mkdtemp(prefix="bench-llmc-"))
    ids = work / "calib_32x512.pt"
    torch.save(calibration_windows(CALIB, load_tokenizer(MODEL), 32, 512, seed=0), ids)
    model_dir = resolve_local_folder(MODEL)
    dense = CachedBackend(TorchBackend.from_spec(MODEL))
    dense_r = evaluate_folder(dense, None, 2048, args.windows)
    rows, records = [], []
    for method in args.methods.split(","):
        out, meta = work / method, work / f"{method}.json"
        if not meta.exists():
            cmd = [args.llmc_python, str(REPO / "eval" / "llmcompressor_baseline.py"), "--model-dir", model_dir,
                   "--calib-ids", str(ids), "--method", method, "--output", str(out)]  # fmt: skip
            p = subprocess.run(cmd, capture_output=True, text=True, check=True)
            meta.write_text(p.stdout.strip().splitlines()[-1])
        info = json.loads(meta.read_text())
        r = evaluate_folder(str(out), dense, 2048, args.windows)
        rec = dict(method=method, llmc_ppl=r.perplexity, llmc_kl=r.kl.mean, llmc_seconds=info["oneshot_seconds"],
                   llmc_rss_mib=info["peak_rss_mib"], llmopt=[])  # fmt: skip
        rows.append([method, "llm-compressor 0.14 (defaults)", fmt(r.perplexity, 3), fmt(r.kl.mean, 4),
                     fmt(info["oneshot_seconds"], 1), fmt(info["peak_rss_mib"] / 1024, 2)])  # fmt: skip
        for label, name, pick in LLMOPT_ROWS[method]:
            ours = next(x for x in json.loads((REPO / "eval" / "results" / name).read_text())["rows"] if pick(x))
            rec["llmopt"].append({"label": label, **ours})
            rows.append([method, label, fmt(ours["ppl"], 3), fmt(ours["kl_mean"], 4),
                         fmt(ours["compress_seconds"], 1), fmt(ours["peak_rss_mib"] / 1024, 2)])  # fmt: skip
        records.append(rec)
        print(rows, flush=True)
    md = [
        "# llmopt vs llm-compressor 0.14 (same model, scheme and calibration ids)",
        "",
        f"SmolLM2-135M-Instruct (bundled). Dense perplexity {dense_r.perplexity:.3f} on {dense_r.windows} x 2048 "
        "tokens of the second half of `valid.nounk.txt`; both sides calibrated on the identical 32 x 512 token "
        "windows (seed 0) of the first half. llm-compressor runs its defaults (GPTQ: act-order 'static', "
        "group scales from the original weights, damp 0.01; symmetric int, `W4A16`-style groups of 64) in its "
        "own environment (transformers 5.17). Seconds: the `oneshot()` call vs llmopt's layer-wise engine "
        "(model load and save excluded on both sides). llmopt's rows come from bench_quant (quant.json, "
        "quant-variants.json: the same 8 windows) / bench_pruning.",
        "",
        markdown_table(["method", "tool", "ppl", "KL vs dense", "seconds", "peak RSS GiB"], rows),
        "",
        f"Machine: {machine_note()}. Produced by `python eval/bench_llmcompressor.py`.",
    ]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"dense_ppl": dense_r.perplexity, "rows": records}, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
