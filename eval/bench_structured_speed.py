"""Decode speed of structured-cut shapes in llama.cpp against the dense model's Q4_0, in alternating rounds.

Speed depends only on a file's shape and tensor types, not on its values, so each shape is the plain cut
(``reconstruct: false``, 8 calibration windows) of the bundled SmolLM2-135M at ``--params`` with the given
axes, exported as q4_0 with the token embedding (tied output head) in q8_0 (llama.cpp's choice for Q4_0 on
these widths) and in q4_0. The dense model's llama.cpp Q4_0 is the reference. Rounds alternate the files
(dense, shape A, shape B, ..., dense, ...) so the host's drift falls on all of them; the table has each
file's median and its ratio to the dense file's median. Single measurements of the same file vary by
±15% on this shared 2-core host, which is why a ratio from one measurement (as in structured.md) is noisy.

    python eval/bench_structured_speed.py [--params 0.6] [--axes 'mlp,depth;mlp,hidden,depth'] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MODEL, TEXT, alternating_speed, cleanup, machine_note, markdown_table  # noqa: E402


def llmopt(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "llmopt.cli", *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=0.6)
    ap.add_argument("--axes", default="mlp,depth;mlp,hidden,depth")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="eval/results/structured-speed")
    a = ap.parse_args()
    import yaml

    work = Path(tempfile.mkdtemp(prefix="llmopt-sspeed-"))
    try:
        files = {"dense Q4_0 (llama.cpp)": work / "dense.gguf"}
        llmopt("export", MODEL, "--to", "gguf", "--type", "q4_0", "--output", str(files["dense Q4_0 (llama.cpp)"]))
        shapes = {}
        for i, axes in enumerate(s.split(",") for s in a.axes.split(";")):
            recipe = {
                "name": f"speed-{i}",
                "calibration": {"data": f"text:{TEXT}#0:0.5", "samples": 8, "seq_len": 512, "seed": 0},
                "stages": [{"stage": "structured", "params": a.params, "axes": axes, "reconstruct": False}],
            }
            (work / f"r{i}.yaml").write_text(yaml.safe_dump(recipe))
            folder = work / f"cut{i}"
            llmopt("compress", MODEL, "--recipe", str(work / f"r{i}.yaml"), "--output", str(folder))
            cfg = json.loads((folder / "config.json").read_text())
            shape = f"{'+'.join(axes)}: hidden {cfg['hidden_size']}, MLP {cfg['intermediate_size']}, "
            shape += f"{cfg['num_hidden_layers']} layers"
            for emb in ("q8_0", "q4_0"):
                label = f"{shape}; q4_0, embedding {emb}"
                files[label] = work / f"cut{i}-{emb}.gguf"
                llmopt("export", str(folder), "--to", "gguf", "--type", "q4_0", "--embedding-type", emb,
                       "--output", str(files[label]))  # fmt: skip
                shapes[label] = shape
        timed = alternating_speed(files, a.rounds, a.threads)
        runs = {k: [x["decode"] for x in v] for k, v in timed.items()}
        mib = {k: f.stat().st_size / 2**20 for k, f in files.items()}
    finally:
        cleanup(work)
    med = {k: statistics.median(v) for k, v in runs.items()}
    dense = med["dense Q4_0 (llama.cpp)"]
    rows = [[k, f"{mib[k]:.1f}", f"{med[k]:.1f}", f"{min(runs[k]):.1f}–{max(runs[k]):.1f}", f"{med[k] / dense:.2f}x"]
            for k in files]  # fmt: skip
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(dict(params=a.params, runs=runs, mib=mib), indent=1))
    md = [
        f"# Decode speed of structured cuts to {a.params:g} of the non-embedding parameters, llama.cpp",
        "",
        f"Plain cuts of the bundled SmolLM2-135M (speed does not depend on the values), q4_0; {a.rounds} "
        f"alternating rounds of a 512-token prompt and 128 greedy tokens, {a.threads} threads; median and range.",
        "",
        markdown_table(["file", "MiB", "decode tok/s (median)", "range", "× dense Q4_0"], rows),
        "",
        f"Machine: {machine_note()}. Produced by `python eval/bench_structured_speed.py --params {a.params:g} "
        f"--axes '{a.axes}' --rounds {a.rounds}`.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
