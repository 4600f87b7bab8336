"""Learning rate of the distillation after a structured cut: one cut, several rates, the same budget.

The cut of a shipped recipe (default ``minitron-60-distill-q4_0``'s structured stage, reconstruction on) is
made once; each rate then distils that cut on the uncut bundled model's logits (the same teacher cache for
every rate) with the recipe's own distill settings and ``--minutes`` of training; every result, and the cut
itself, is evaluated in torch (float32) on the second half of WikiText-2 valid and on the texts named by
``--eval`` (nothing calibrates or trains on them). Writes eval/results/structured-lr.{md,json}.

    python eval/bench_structured_lr.py --lrs 1e-4,3e-4,1e-3 --minutes 10 --eval lee

Runs of an earlier invocation at the same recipe and budget are kept in the table (same label: replaced).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_structured import shipped_stage  # noqa: E402
from common import (  # noqa: E402
    EVAL,
    MODEL,
    REPO,
    cleanup,
    describe_text,
    eval_texts,
    evaluate_folder,
    fmt,
    machine_note,
    markdown_table,
    out_flag,
    require_text,
    run_compress,
    text_bench_args,
)


def variants(a) -> list[dict]:
    """Each run's changes to the recipe's distill stage: ``--variants`` parsed, else one ``lr`` per ``--lrs``."""
    import yaml

    if not a.variants:
        return [{"lr": float(x)} for x in a.lrs.split(",")]
    runs = []
    for run in a.variants.split(";"):
        changes = {}
        for item in run.split(","):
            key, _, value = item.partition("=")
            parsed = yaml.safe_load(value)
            if isinstance(parsed, str):  # PyYAML reads 3e-4 (no dot) as a string
                try:
                    parsed = float(parsed)
                except ValueError:
                    pass
            changes[key.strip()] = parsed
        runs.append(changes)
    return runs


def main() -> None:
    ap = text_bench_args(__doc__.split("\n\n")[0], 8, "2048-token windows per text", "structured-lr")
    ap.add_argument("--recipe", default="minitron-60-distill-q4_0")
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    ap.add_argument(
        "--variants",
        default=None,
        help="instead of --lrs: distill settings per run, runs split by ';', settings by ',' "
        "(e.g. 'lr=3e-4;lr=3e-4,grad_accum=1')",
    )
    ap.add_argument("--minutes", type=float, default=10.0, help="training wall clock per rate")
    ap.add_argument("--cut-dir", default=None, help="reuse a cut made by an earlier run (kept there)")
    a = ap.parse_args()
    require_text()
    texts = {"wiki2-valid-2nd-half": EVAL, **eval_texts(a.eval)}
    import yaml

    raw = yaml.safe_load((REPO / "configs" / f"{a.recipe}.yaml").read_text())
    cal = raw["calibration"]
    cut = shipped_stage(a.recipe, "structured")
    distill = shipped_stage(a.recipe, "distill")
    work = Path(tempfile.mkdtemp(prefix="llmopt-slr-"))
    rows = []
    try:
        folder = Path(a.cut_dir) if a.cut_dir else work / "cut"
        if not (folder / "llmopt_report.json").is_file():
            rep = run_compress({"calibration": cal, "stages": [cut]}, folder)
            print(f"cut: {rep['wall_seconds']} s", flush=True)

        def measure(label: str, path: Path, extra: dict) -> None:
            ppl = {
                n: evaluate_folder(str(path), None, a.seq_len, a.windows, data=t).perplexity for n, t in texts.items()
            }
            rows.append(dict(label=label, **extra, ppl=ppl))
            print(json.dumps(rows[-1]), flush=True)

        measure("cut, no training", folder, {})
        for i, changes in enumerate(variants(a)):
            stage = distill | changes | {"max_minutes": a.minutes, "teacher": MODEL}
            out = work / f"run{i}"
            rep = run_compress({"calibration": cal, "stages": [stage]}, out, model=str(folder))
            d = rep["model_stages"]["0:distill"]
            label = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in changes.items())
            measure(label, out, dict(changes, tokens=d.get("tokens"), train_minutes=d.get("minutes")))
            cleanup(out)
    finally:
        if not a.cut_dir:
            cleanup(work)
    out = Path(a.out)
    earlier = out.with_suffix(".json")
    if earlier.is_file():  # runs of an earlier invocation at the same recipe and budget stay in the table
        old = json.loads(earlier.read_text())
        if (old.get("recipe"), old.get("minutes")) == (a.recipe, a.minutes):
            labels = {r["label"] for r in rows}
            rows[1:1] = [r for r in old["rows"] if r["label"] not in labels]
    out.with_suffix(".json").write_text(json.dumps(dict(rows=rows, recipe=a.recipe, minutes=a.minutes), indent=1))
    names = list(texts)
    lines = [
        f"# Distillation learning rate after the {a.recipe} cut (SmolLM2-135M-Instruct, bundled)",
        "",
        f"One cut (the recipe's structured stage), then each rate trains it for {a.minutes:g} minutes with the "
        "recipe's other distill settings on the uncut model's logits (same teacher cache). Perplexity in torch "
        f"(float32), {a.windows} x {a.seq_len}-token windows of: "
        + "; ".join(f"{n} = {describe_text(s)}" for n, s in texts.items())
        + ". Calibration and training: the first half of WikiText-2 valid.",
        "",
        markdown_table(
            ["run", "trained tokens", *[f"ppl {n}" for n in names]],
            [
                [r["label"], f"{r['tokens']:,}" if r.get("tokens") else "", *[fmt(r["ppl"][n], 2) for n in names]]
                for r in rows
            ],
        ),
        "",
        f"{machine_note()}. Produced by `python eval/bench_structured_lr.py "
        + (f"--recipe {a.recipe} " if a.recipe != "minitron-60-distill-q4_0" else "")
        + (f"--variants '{a.variants}'" if a.variants else f"--lrs {a.lrs}")
        + f" --minutes {a.minutes:g}"
        + "".join(f" --eval {e}" for e in a.eval or [])
        + out_flag(out, "structured-lr")
        + "`.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
