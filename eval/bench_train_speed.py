"""Training speed of the distill stage: the shipped recipes with the old settings against the new ones,
alternating in one process on the same student (A, B, A, B, ...), so a machine shared with other jobs
slows both alike and the ratio of neighbouring runs stays meaningful.

Rows: the shipped recipes up to their distill stage (``minitron-60-distill-q4_0``: the 60% structured cut,
then distillation; ``gptq-q4_0-qat``: GPTQ q4_0, then QAT). The recipe runs once through
``llmopt.compression.compress`` up to its distill stage (the one-shot stages, the teacher's top-k cache);
there the distillation loop is run ``--rounds`` times per variant on fresh copies of the student, each run
``--steps`` optimizer steps of the recipe's batch (4 × 512 tokens). Tokens/s of a run: its steps' tokens
over their wall clock (each step's own ``seconds`` in the curve), the first step left out (allocation
warm-up); held-out evaluations and the teacher cache are outside those clocks. Variants:

* ``old``: float32, the reference chunked head + loss under activation checkpointing, fake quantization
  recomputed every micro-batch (``mixed_precision: no, fused_loss: false, fake_quant_once: false``);
* ``new``: the defaults (bfloat16 autocast where the CPU has AVX512-BF16/AMX, fused head + top-k loss,
  fake quantization once per step);
* ``new-b2`` (``--variants``): the defaults with 2 windows per micro-batch, half the accumulation.

``--quality-steps N`` adds one longer ``old`` and ``new`` run per row with a held-out loss every 10 steps
(always computed in float32), to check that the faster settings train as well.

    python eval/bench_train_speed.py                       # both rows, old/new, 3 rounds of 6 steps
    python eval/bench_train_speed.py --rows minitron-60 --steps 4 --rounds 2 --variants old,new,new-b2
    python eval/bench_train_speed.py --rows minitron-60 --rounds 0 --quality-steps 40 --out /tmp/q
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CALIB, MODEL, REPO, fmt, machine_note, markdown_table, require_text  # noqa: E402

ROWS = {"minitron-60": "minitron-60-distill-q4_0", "gptq-q4_0-qat": "gptq-q4_0-qat"}
VARIANTS = {
    "old": {"mixed_precision": "no", "fused_loss": False, "fake_quant_once": False},
    "new": {},
    "new-b2": {"batch_size": 2, "grad_accum": 2},
}


class _Done(Exception):
    """Carries the measurements out of compress() once the distill stage's runs are done."""

    def __init__(self, results):
        super().__init__("done")
        self.results = results


def steady_tok_s(report: dict, skip: int = 1) -> float:
    """Tokens/s of a run's steps after the first ``skip`` (each step's own wall clock)."""
    train = report["curve"]["train"]
    per_step = train[0]["tokens"]  # the run starts at 0 tokens
    return per_step * len(train[skip:]) / sum(r["seconds"] for r in train[skip:])


def measure(row: str, args) -> dict:
    """Run the row's recipe up to its distill stage; there, the alternating runs."""
    import torch

    from llmopt.compression import compress
    from llmopt.distill import loop
    from llmopt.recipe import parse_recipe

    rec = parse_recipe(REPO / "llmopt" / "recipes" / f"{ROWS[row]}.yaml")
    i = next(i for i, s in enumerate(rec.stages) if s.stage == "distill")
    steps = max(args.steps, args.quality_steps)
    entry = rec.stages[i].model_copy(update={"max_tokens": steps * 2048, "max_minutes": None})
    rec = rec.model_copy(update={"stages": [*rec.stages[:i], entry]})
    original = loop.run

    def runs(model, job, device):
        base_model, base_state = copy.deepcopy(model), copy.deepcopy(job.state)
        out = {"speed": [], "quality": {}}

        def one(variant: str, n_steps: int, eval_every: int) -> dict:
            over = {**VARIANTS[variant], "max_tokens": n_steps * 2048, "eval_every": eval_every}
            cfg = job.cfg.model_copy(update=over)
            j = dataclasses.replace(job, cfg=cfg, state=copy.deepcopy(base_state), checkpoints=None, resume=False)
            m = copy.deepcopy(base_model)
            t0 = time.perf_counter()
            report, _ = original(m, j, device)
            del m
            return {"variant": variant, "report": report, "wall_s": time.perf_counter() - t0}

        for r in range(args.rounds):
            for v in args.variants.split(","):
                res = one(v, args.steps, 10**6)
                tok_s = steady_tok_s(res["report"])
                out["speed"].append({"round": r, "variant": v, "tok_s": tok_s})
                print(f"{row} round {r} {v}: {tok_s:.1f} tokens/s", flush=True)
        if args.quality_steps:
            for v in ("old", "new"):
                res = one(v, args.quality_steps, 10)
                out["quality"][v] = {"heldout": res["report"]["curve"]["heldout"], "tok_s": steady_tok_s(res["report"])}
                print(f"{row} quality {v}: {[round(h['loss'], 4) for h in out['quality'][v]['heldout']]}", flush=True)
        raise _Done(out)

    loop.run = runs
    work = Path(tempfile.mkdtemp(prefix="bench-train-speed-"))
    try:
        compress(MODEL, rec, work / "out", calib=args.calib, calib_samples=args.calib_samples, dtype="float32")
    except _Done as d:
        return {"recipe": ROWS[row], "threads": torch.get_num_threads(), **d.results}
    finally:
        loop.run = original
    raise RuntimeError("the distill stage did not run")


def summarise(rows: dict) -> tuple[str, dict]:
    table, summary = [], {}
    for row, r in rows.items():
        by = {}
        for s in r["speed"]:
            by.setdefault(s["variant"], {})[s["round"]] = s["tok_s"]
        old = by.get("old", {})
        for v, per_round in by.items():
            med = statistics.median(per_round.values())
            ratios = [per_round[k] / old[k] for k in per_round if k in old]
            ratio = statistics.median(ratios) if ratios and v != "old" else None
            summary.setdefault(row, {})[v] = {"tok_s_median": med, "ratio_to_old_median": ratio, "ratios": ratios}
            rng = f"{min(ratios):.2f}–{max(ratios):.2f}" if ratios and v != "old" else ""
            table.append([row, v, fmt(med, 1), fmt(ratio, 2) if ratio else "1", rng])
    md = markdown_table(["recipe", "settings", "tokens/s (median)", "× old (median of rounds)", "range"], table)
    for row, r in rows.items():
        if r["quality"]:
            q = r["quality"]
            md += f"\n\nHeld-out loss of {row} (float32 evaluation) by step:\n\n"
            steps = [h["step"] for h in q["old"]["heldout"]]
            hdr = ["settings", *[f"step {s}" for s in steps]]
            lines = [[v, *[fmt(h["loss"], 4) for h in q[v]["heldout"]]] for v in ("old", "new")]
            md += markdown_table(hdr, lines)
    return md, summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--variants", default="old,new", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per speed run (the first is left out)")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the variants")
    ap.add_argument("--quality-steps", type=int, default=0, help="steps of the old/new quality runs (0: none)")
    ap.add_argument("--calib", default=CALIB)
    ap.add_argument("--calib-samples", type=int, default=None, help="fewer = faster one-shot stages (same shapes)")
    ap.add_argument("--out", default=str(REPO / "eval" / "results" / "train-speed"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    require_text()
    rows = {}
    for row in args.rows.split(","):
        rows[row] = measure(row, args)
    md, summary = summarise(rows)
    argv = sys.argv[1:]
    if "--out" in argv:  # where this run wrote is no part of the setting (and may be a temp folder)
        k = argv.index("--out")
        argv = argv[:k] + argv[k + 2 :]
    cmd = "python eval/bench_train_speed.py " + " ".join(argv)
    head = (
        "# Distillation training speed: old vs new settings\n\n"
        f"{machine_note()}. Command: `{cmd.strip()}`. Runs alternate in one process (A, B, A, B); tokens/s of "
        f"each run's steps after the first ({args.steps} steps of 4 × 512 tokens), teacher cache and held-out "
        "evaluations excluded. old = float32, reference chunked loss, fake quantization per micro-batch; "
        "new = the defaults (bfloat16 autocast, fused head + top-k loss, fake quantization once per step).\n\n"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(head + md + "\n")
    out.with_suffix(".json").write_text(
        json.dumps(
            {"args": {k: v for k, v in vars(args).items() if k != "out"}, "summary": summary, "rows": rows}, indent=1
        )
    )
    print(head + md)


if __name__ == "__main__":
    main()
