"""One-shot structured cut of the bundled SmolLM2-135M with and without reconstruction (issue #27), in
torch: perplexity of the plain cut (``reconstruct: false``) and the reconstructed cut (the default) on
the second half of WikiText-2 valid and on the Lee news text (nothing calibrates on it). Calibration:
32 x 512 windows of the first half, seed 0, as the shipped recipes. Writes OUT.md and OUT.json.

    python eval/bench_reconstruct.py [--params 0.6] [--windows 8] [--out eval/results/reconstruct-60]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import EVAL, LEE, MODEL, TEXT, machine_note, markdown_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=0.6)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or f"eval/results/reconstruct-{round(args.params * 100)}")

    from llmopt.backends.torch_backend import TorchBackend
    from llmopt.data import calibration_windows
    from llmopt.evaluation import evaluate
    from llmopt.models import load_model, load_tokenizer
    from llmopt.structured import measure, plan_cut, prune
    from llmopt.structured.config import StructuredConfig
    from llmopt.structured.reconstruct import reconstruct

    texts = {"wikitext-2 valid, 2nd half": EVAL, "lee news": f"text:{LEE}"}
    model = load_model(MODEL).model
    windows = calibration_windows(f"text:{TEXT}#0:0.5", load_tokenizer(MODEL), 32, 512, 0)
    cfg = StructuredConfig(stage="structured", params=args.params, axes=["mlp", "hidden", "depth"])
    imp = measure(model, windows, progress=False)
    cut, sizes = plan_cut(model, cfg, imp)
    teacher = copy.deepcopy(model)
    prune(model, cfg, imp, cut)

    def scores(m) -> dict:
        be = TorchBackend(m, MODEL, threads=args.threads)
        return {k: evaluate(be, data=v, max_windows=args.windows, progress=False).perplexity for k, v in texts.items()}

    rows = {"plain cut": scores(model)}
    t0 = time.perf_counter()
    reconstruct(teacher, model, cut, windows, damp=cfg.damp, progress=False)
    seconds = time.perf_counter() - t0
    rows["reconstructed cut"] = scores(model)
    for k, v in rows.items():
        print(k, {t: round(p, 2) for t, p in v.items()}, flush=True)
    plain = rows["plain cut"]
    table = [[k] + [f"{v[t]:.2f} ({v[t] / plain[t]:.3f}x)" for t in texts] for k, v in rows.items()]
    md = [
        f"# One-shot structured cut, params {args.params} (hidden {sizes.hidden}, MLP {sizes.intermediate}, "
        f"{sizes.layers} layers), with and without reconstruction",
        "",
        f"Perplexity (x the plain cut's), torch, {args.windows} x 2048-token windows of each text. Calibration: "
        f"32 x 512 windows of the first half of WikiText-2 valid. Reconstruction took {seconds:.0f} s.",
        "",
        markdown_table(["model"] + list(texts), table),
        "",
        f"Machine: {machine_note()}. Produced by `python eval/bench_reconstruct.py --params {args.params} "
        f"--windows {args.windows}`.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"sizes": vars(sizes), "seconds": seconds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
