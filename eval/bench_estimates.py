"""The duration llmopt prints before a run against the duration measured, for every shipped recipe with
distillation (``configs/*distill*``, ``*qat*``, ``tour``), with each run's peak RSS by phase.

Each recipe runs alone, in its own process, as a user runs it: ``llmopt compress bundled:smollm2 --recipe R
--output DIR`` (``tour``: with ``--export gguf,onnx --eval``, the whole loop its header documents), with a
cold teacher cache (a fresh ``LLMOPT_CACHE`` whose ``gguf/`` links to the real one, so the bundled model's
conversion stays cached, as the estimate assumes). Recipes that name the Hub's ``wikitext2`` get
``--calib`` the local first half of the WikiText-2 validation text (offline). ``distill`` distils an
already pruned folder: a SparseGPT 50% output made first (not timed). The measured duration is the wall
clock of the command, start-up included; the estimate is the printed line (whole minutes) and the same
function's seconds. Writes eval/results/estimates.md and .json.

    python eval/bench_estimates.py                            # every recipe, ~4.5 hours alone on 2 cores
    python eval/bench_estimates.py --recipes gptq-q4_0-qat --max-minutes 1 --out /tmp/est   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CALIB, MODEL, REPO, fmt, machine_note, markdown_table, require_text  # noqa: E402

WHOLE_LOOP = {"tour": ["--export", "gguf,onnx", "--eval"]}
PRUNED_INPUT = {"distill": "sparsegpt-50"}  # recipe → the recipe that makes its input folder
WITHIN = 0.25


def shipped() -> list[str]:
    names = {p.stem for pat in ("*distill*.yaml", "*qat*.yaml", "tour.yaml") for p in (REPO / "configs").glob(pat)}
    return sorted(names)


def recipe_file(name: str, max_minutes: float | None, work: Path) -> Path:
    """The shipped recipe, or a copy whose distill stages train ``max_minutes`` (a smoke run)."""
    src = REPO / "configs" / f"{name}.yaml"
    if max_minutes is None:
        return src
    data = yaml.safe_load(src.read_text())
    for st in data["stages"]:
        if st.get("stage") == "distill":
            st["max_minutes"] = max_minutes
    out = work / f"{name}.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def cold_cache(work: Path) -> Path:
    """A fresh llmopt cache: no teacher logits; the converted GGUFs linked from the real cache."""
    root = work / "cache"
    root.mkdir()
    real = Path(os.environ.get("LLMOPT_CACHE", "~/.cache/llmopt")).expanduser() / "gguf"
    if real.is_dir():
        (root / "gguf").symlink_to(real)
    return root


def run(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return seconds, p.stdout


def estimate_of(model: str, rec_path: Path, extra: list[str]) -> float:
    from llmopt.pipeline import PipelineOptions, estimate
    from llmopt.pipeline.options import model_parameter_count
    from llmopt.recipe import apply_calibration_overrides, parse_recipe

    calib = extra[extra.index("--calib") + 1] if "--calib" in extra else None
    rec = apply_calibration_overrides(parse_recipe(str(rec_path)), data=calib)
    opts = PipelineOptions(export=("gguf", "onnx"), eval=True) if "--eval" in extra else PipelineOptions()
    return estimate(model_parameter_count(model), rec, opts.with_recipe(rec)).seconds


def measure(name: str, max_minutes: float | None, work: Path) -> dict:
    rec_path = recipe_file(name, max_minutes, work)
    env = {**os.environ, "LLMOPT_CACHE": str(cold_cache(work)), "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "llmopt.cli", "compress"]
    raw = yaml.safe_load(rec_path.read_text())
    datas = [raw.get("calibration", {}).get("data")] + [st.get("data") for st in raw.get("stages", [])]
    uses_hub = "wikitext2" in datas  # the recipe's own data, not its comments
    extra = (["--calib", CALIB] if uses_hub else []) + WHOLE_LOOP.get(name, [])
    model = MODEL
    if name in PRUNED_INPUT:
        model = str(work / "input")
        run(cli + [MODEL, "--recipe", PRUNED_INPUT[name], "--output", model, "--calib", CALIB], env)
    out = work / "out"
    seconds, stdout = run(cli + [model, "--recipe", str(rec_path), "--output", str(out), "--overwrite", *extra], env)
    line = next((ln for ln in stdout.splitlines() if ln.startswith("expected duration")), "")
    m = re.search(r"~(\d+) min", line)
    report = json.loads((out / "llmopt_report.json").read_text())
    distill = next(v for k, v in report.get("model_stages", {}).items() if k.endswith(":distill"))
    est = estimate_of(model, rec_path, extra)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return dict(
        recipe=name,
        commit=commit.stdout.strip(),
        date=time.strftime("%Y-%m-%d"),
        command=" ".join(["llmopt compress", model, "--recipe", name, *extra]).replace(str(REPO.parent), ".."),
        max_minutes=max_minutes,
        printed=line,
        printed_minutes=int(m.group(1)) if m else None,
        estimate_seconds=round(est, 1),
        measured_seconds=round(seconds, 1),
        ratio=round(est / seconds, 3),
        within=abs(est / seconds - 1) <= WITHIN,
        peak_rss_mib=report["peak_rss_mib"],
        peak_rss_mib_by_phase=report["peak_rss_mib_by_phase"],
        distill_peaks=distill.get("peak_rss_mib_by_phase", {}),
        tokens=distill["tokens"],
        train_minutes=distill["minutes"],
        teacher_seconds=distill["teacher_seconds"],
        teacher_windows_computed=distill["teacher_windows_computed"],
        teacher_windows_extended=distill.get("teacher_windows_extended"),
    )


def write(records: list[dict], out: Path, args) -> None:
    header = ["recipe", "measured on", "printed estimate", "estimate min", "measured min", "estimate / measured",
              "within ±25%", "trained tokens", "teacher windows (+ extended)", "peak RSS GiB",
              "peak GiB: teacher cache / train / finish / save"]  # fmt: skip
    rows = []
    for r in records:
        d, p = r["distill_peaks"], r["peak_rss_mib_by_phase"]
        phases = " / ".join(fmt(v / 1024, 2) if v else "–" for v in (d.get("teacher_cache"), d.get("train"),
                            d.get("finish"), p.get("save")))  # fmt: skip
        rows.append([r["recipe"], f"{r.get('date', '?')} ({r.get('commit', '?')})", f"~{r['printed_minutes']} min",
                     fmt(r["estimate_seconds"] / 60, 1),
                     fmt(r["measured_seconds"] / 60, 1), fmt(r["ratio"], 2), "yes" if r["within"] else "**no**",
                     f"{r['tokens']:,}", f"{r['teacher_windows_computed']} (+{r['teacher_windows_extended']})",
                     fmt(r["peak_rss_mib"] / 1024, 2), phases])  # fmt: skip
    missing = [n for n in shipped() if n not in {r["recipe"] for r in records}]
    rows += [[n, "not measured yet"] + [""] * (len(header) - 2) for n in missing]
    budget = "shipped budgets" if args.max_minutes is None else f"distill budgets set to {args.max_minutes} min"
    text = (
        "# Estimated vs measured duration of the shipped recipes with distillation\n\n"
        f"`llmopt compress bundled:smollm2 --recipe R` ({budget}), each recipe alone in its own process, teacher "
        "cache cold; `--calib` the first half of `valid.nounk.txt` where the recipe names the Hub's wikitext2; "
        "`tour` with `--export gguf,onnx --eval`. The estimate is the line printed before the run; measured = "
        "wall clock of the command. Rows measured in separate runs (each alone on the machine) are merged: "
        "`measured on` gives the date and the commit each row ran; a row is measured again when the estimate or "
        "the recipe changes.\n\n"
        + markdown_table(header, rows)
        + f"\n\nMachine: {machine_note()}. Each row produced by `python eval/bench_estimates.py --recipes R`"
        + f" (this run: `--recipes {args.recipes}`"
        + ("" if args.max_minutes is None else f" `--max-minutes {args.max_minutes}`")
        + ")"
        + ".\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"records": records}, indent=1))
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default=",".join(shipped()), help="comma-separated config names")
    ap.add_argument("--max-minutes", type=float, default=None, help="override every distill budget (smoke runs)")
    ap.add_argument("--out", default=str(REPO / "eval" / "results" / "estimates"))
    ap.add_argument("--fresh", action="store_true", help="drop the rows OUT.json holds instead of merging into them")
    ap.add_argument("--keep", default=None, help="move each recipe's output folder to KEEP/<recipe> (to evaluate it)")
    args = ap.parse_args()
    require_text()
    names = args.recipes.split(",")
    bad = [n for n in names if not (REPO / "configs" / f"{n}.yaml").is_file()]
    if bad:
        sys.exit(f"unknown recipes {bad}; shipped with distillation: {', '.join(shipped())}")
    old = Path(args.out).with_suffix(".json")
    kept = [] if args.fresh or not old.is_file() else json.loads(old.read_text())["records"]
    records = [r for r in kept if r["recipe"] not in names]
    for name in names:
        work = Path(tempfile.mkdtemp(prefix=f"bench-est-{name}-"))
        try:
            records.append(measure(name, args.max_minutes, work))
            if args.keep:
                dest = Path(args.keep) / name
                shutil.rmtree(dest, ignore_errors=True)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(work / "out"), dest)
            r = records[-1]
            print(f"{name}: estimate {r['estimate_seconds'] / 60:.1f} min, measured {r['measured_seconds'] / 60:.1f}"
                  f" min ({r['ratio']:.2f}), peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB", flush=True)  # fmt: skip
        finally:
            shutil.rmtree(work, ignore_errors=True)
        write(sorted(records, key=lambda r: r["recipe"]), Path(args.out), args)


if __name__ == "__main__":
    main()
