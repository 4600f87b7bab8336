"""One-shot structured cut of the bundled SmolLM2-135M with and without reconstruction (issue #27), in
torch, for each set of axes that ``params`` shrinks (``--axes``: width and depth, depth and MLP only, ...):
perplexity of the plain cut (``reconstruct: false``) and the reconstructed cut (the default) on
the second half of WikiText-2 valid and on the Lee news text (nothing calibrates on it). Calibration:
``--samples`` x 512 windows of the first half, seed 0 (by default as many as ``configs/minitron-60.yaml``
calibrates on). Writes OUT.md and OUT.json.

    python eval/bench_reconstruct.py [--params 0.6] [--windows 8] [--axes 'mlp,depth;mlp,hidden,depth']
        [--depth-ranking loss|block_influence] [--samples N]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import EVAL, LEE, MODEL, TEXT, machine_note, markdown_table, shipped_calibration  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=0.6)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--axes",
        default="mlp,hidden,depth;mlp,depth;mlp,hidden;mlp,hidden,depth,heads",
        help="axis sets that params shrinks, one row pair each, split by ';'",
    )
    ap.add_argument("--depth-ranking", default="loss", choices=["loss", "block_influence"])
    ap.add_argument("--samples", type=int, default=None, help="calibration windows (default: minitron-60's)")
    ap.add_argument("--refine-epochs", type=int, default=None, help="block-wise refinement (default: minitron-60's)")
    args = ap.parse_args()
    args.samples = args.samples or shipped_calibration("minitron-60")["samples"]
    if args.refine_epochs is None:
        from llmopt.recipe import parse_recipe

        args.refine_epochs = parse_recipe("minitron-60").stages[0].refine_epochs
    out = Path(args.out or f"eval/results/reconstruct-{round(args.params * 100)}")

    from llmopt.backends.torch_backend import TorchBackend
    from llmopt.data import calibration_windows
    from llmopt.evaluation import evaluate
    from llmopt.models import load_model, load_tokenizer
    from llmopt.structured import measure, plan_cut, prune
    from llmopt.structured.config import StructuredConfig
    from llmopt.structured.reconstruct import reconstruct

    texts = {"wikitext-2 valid, 2nd half": EVAL, "lee news": f"text:{LEE}"}
    base = load_model(MODEL).model
    windows = calibration_windows(f"text:{TEXT}#0:0.5", load_tokenizer(MODEL), args.samples, 512, 0)
    imp = measure(base, windows, progress=False)  # the ranking does not depend on the axes

    def scores(m) -> dict:
        be = TorchBackend(m, MODEL, threads=args.threads)
        return {k: evaluate(be, data=v, max_windows=args.windows, progress=False).perplexity for k, v in texts.items()}

    results = []
    for axes in [a.split(",") for a in args.axes.split(";")]:
        cfg = StructuredConfig(stage="structured", params=args.params, axes=axes, depth_ranking=args.depth_ranking)
        model = copy.deepcopy(base)
        cut, sizes = plan_cut(model, cfg, imp)
        prune(model, cfg, imp, cut)
        plain = scores(model)
        t0 = time.perf_counter()
        kw = dict(damp=cfg.damp, refine_epochs=args.refine_epochs, refine_lr=cfg.refine_lr)
        reconstruct(base, model, cut, windows, progress=False, **kw)
        seconds = time.perf_counter() - t0
        rec = scores(model)
        results.append(dict(axes=axes, sizes=vars(sizes), seconds=seconds, plain=plain, reconstructed=rec))
        print(json.dumps(results[-1]), flush=True)
        del model

    table = []
    for r in results:
        z = r["sizes"]
        shape = f"{'+'.join(r['axes'])}: hidden {z['hidden']}, MLP {z['intermediate']}, {z['layers']} layers"
        shape += f", {z['heads']} heads" if "heads" in r["axes"] else ""
        for kind in ("plain", "reconstructed"):
            v, plain = r[kind], r["plain"]
            table.append([shape, kind] + [f"{v[t]:.2f} ({v[t] / plain[t]:.3f}x)" for t in texts])
    lr = StructuredConfig.model_fields["refine_lr"].default
    refined = (
        f"Reconstructed: least squares + {args.refine_epochs} epochs of block-wise refinement "
        f"(lr {lr:g} on a cosine decay). "
    )
    refined = refined if args.refine_epochs else ""
    md = [
        f"# One-shot structured cut to {args.params:g} of the non-embedding parameters, with and without "
        "reconstruction, by the axes that shrink",
        "",
        f"Depth ranked by {args.depth_ranking.replace('_', ' ')}. Perplexity (x that shape's plain cut), torch, "
        f"{args.windows} x 2048-token windows of each text. Calibration: "
        f"{args.samples} x 512 windows of the first half of WikiText-2 valid "
        "(nothing calibrates on the Lee news text). "
        + refined
        + "Reconstruction took "
        + ", ".join(f"{r['seconds']:.0f}" for r in results)
        + " s.",
        "",
        markdown_table(["shape", "cut"] + list(texts), table),
        "",
        f"Machine: {machine_note()}. Produced by `python eval/bench_reconstruct.py --params {args.params} "
        f"--windows {args.windows} --axes '{args.axes}' --depth-ranking {args.depth_ranking} "
        f"--samples {args.samples} --refine-epochs {args.refine_epochs}`.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    meta = {"params": args.params, "refine_epochs": args.refine_epochs, "refine_lr": lr}
    out.with_suffix(".json").write_text(json.dumps(meta | {"results": results}, indent=1))


if __name__ == "__main__":
    main()
