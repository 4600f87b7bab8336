"""The run report (``report.json`` / ``report.md`` / ``report.png``) and ``llmopt report DIR [DIR ...]``.

One row per artifact a person can run: the input model (the reference), the compressed model in
transformers, its GGUF and ONNX exports, each with its size on disk, bits per weight of its Linears,
perplexity, KL divergence and top-1 agreement against the input model on the same token windows, and
prefill / decode tokens per second on this machine. The plots put perplexity against size and against
decode speed and mark the Pareto front (no other row both smaller/faster and better).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from llmopt.baseline import baseline_markdown, beside_baseline, notes
from llmopt.errors import LLMOptError

REPORT_KIND = "llmopt-run-report"
REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"
_MODEL_FILES = (".safetensors",)


def _bytes(path: Path, transformers: bool = False) -> int:
    """Bytes of an artifact: a file, an ONNX folder, or the model weights of an HF folder (top level)."""
    if path.is_file():
        return path.stat().st_size
    if transformers:
        return sum(p.stat().st_size for p in path.glob("*.safetensors") if p.name != "quantization.safetensors")
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _row(name: str, a: dict | None, ev: dict | None, size: int | None, bpw: float | None) -> dict:
    row = {"artifact": name, "path": (a or {}).get("path"), "backend": (a or {}).get("backend", "torch")}
    row["role"] = "input" if name == "input" else (a or {}).get("role", "llmopt")
    if (a or {}).get("label"):
        row["label"] = a["label"]
    row["size_bytes"] = size
    row["bits_per_weight"] = bpw
    if ev:
        row["perplexity"] = ev.get("perplexity")
        kl = ev.get("kl") or {}
        row["kl"] = kl.get("mean", 0.0 if name == "input" else None)
        row["top1"] = kl.get("top1_agreement", 1.0 if name == "input" else None)
        sp = ev.get("speed") or {}
        row["prefill_tok_s"] = sp.get("prefill_tok_s")
        row["decode_tok_s"] = sp.get("decode_tok_s")
        row["threads"] = sp.get("threads")
    return row


def build_report(
    model, recipe, compress_report, artifacts, evals, harness, opts, seconds, folder: Path, name: str
) -> dict:
    """report.json's content (see the module docstring); ``folder``: where the artifacts are now, ``name``:
    the output folder's final name."""
    stages = compress_report.get("stages", {})
    bpw = None
    for s in stages.values():
        if "bits_per_weight" in s:
            bpw = s["bits_per_weight"]
    rows = []
    if evals.get("input"):
        rows.append(_row("input", {"path": model, "backend": "torch"}, evals.get("input"), None, 32.0))
    for art, a in artifacts.items():
        path = folder / a["path"]
        exp = a.get("export", {})
        row_bpw = exp.get("linear_bits_per_weight", exp.get("bits_per_weight", bpw if art != "transformers" else None))
        if art == "transformers":
            row_bpw = None  # the HF folder stores dequantized float weights (codes are a side file)
        rows.append(_row(art, a, evals.get(art), _bytes(path, transformers=art == "transformers"), row_bpw))
    harness_rows = []
    for art, r in harness.items():
        for task, t in (r.get("tasks") or {}).items():
            for metric, v in ((t or {}).get("metrics") or {}).items():
                if isinstance(v, dict) and "value" in v:
                    harness_rows.append({"artifact": art, "task": task, "metric": metric, **v})
    return {
        "kind": REPORT_KIND,
        "model": model,
        "recipe": getattr(recipe, "name", None),
        "output": name,
        "stages": stages,
        "compress": {k: compress_report.get(k) for k in ("compress_seconds", "total_seconds", "peak_rss_mib", "dtype")},
        "eval": {"data": opts.eval_data, "seq_len": opts.eval_seq_len, "windows": opts.eval_windows} if evals else None,
        "rows": rows,
        "baseline": beside_baseline(rows),
        "notes": notes(recipe, artifacts),
        "harness": harness_rows,
        "seconds": seconds,
    }


def _fmt(x, spec=".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)


HEADER = [
    "run",
    "artifact",
    "backend",
    "size MiB",
    "bits/w",
    "perplexity",
    "KL",
    "top-1",
    "prefill tok/s",
    "decode tok/s",
]


def table_rows(report: dict, run: str | None = None) -> list[list[str]]:
    run = run or report.get("output", "")
    out = []
    for r in report["rows"]:
        out.append(
            [
                run if r["artifact"] != "input" else "(input model)",
                r.get("label") or r["artifact"] if r["artifact"] != "input" else str(r.get("path")),
                r.get("backend") or "",
                _fmt(r["size_bytes"] / 2**20 if r.get("size_bytes") else None, ".1f"),
                _fmt(r.get("bits_per_weight"), ".2f"),
                _fmt(r.get("perplexity"), ".3f"),
                _fmt(r.get("kl"), ".4f"),
                _fmt(r.get("top1"), ".3f"),
                _fmt(r.get("prefill_tok_s"), ".0f"),
                _fmt(r.get("decode_tok_s"), ".1f"),
            ]
        )
    return out


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    ev = report.get("eval") or {}
    lines = [f"# llmopt run: {report.get('output')}", ""]
    lines.append(f"Input `{report.get('model')}`, recipe `{report.get('recipe')}`.")
    c = report.get("compress") or {}
    if c.get("total_seconds") is not None:
        lines.append(
            f"Compression {c['total_seconds']:.0f} s (engine {c.get('compress_seconds') or 0:.0f} s), "
            f"peak RSS {c.get('peak_rss_mib') or 0:.0f} MiB, {c.get('dtype')}."
        )
    if ev:
        lines.append(
            f"Evaluation: `{ev.get('data')}`, {ev.get('windows')} windows x {ev.get('seq_len')} tokens, the same "
            "token ids for every row; KL and top-1 against the input model."
        )
    lines += ["", markdown_table(HEADER, table_rows(report)), ""]
    lines += baseline_markdown(report)
    for note in report.get("notes") or []:
        lines += [f"Note: {note}", ""]
    if report.get("harness"):
        lines += ["## lm-evaluation-harness", ""]
        rows = [
            [h["artifact"], h["task"], h["metric"], _fmt(h.get("value"), ".4f"), _fmt(h.get("stderr"), ".4f")]
            for h in report["harness"]
        ]
        lines += [markdown_table(["artifact", "task", "metric", "value", "stderr"], rows), ""]
    s = report.get("seconds") or {}
    if s:
        lines.append("Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s.items()) + ".")
    return "\n".join(lines) + "\n"


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Row i is on the front when no other point has x ≤ xᵢ and y ≤ yᵢ with one strictly smaller
    (both axes: lower is better)."""
    out = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def plot_reports(reports: list[dict], path: Path) -> bool:
    """Perplexity against size and against decode tok/s for every row of every report, the input model and
    the llama.cpp baseline marked as reference points (dashed lines through them), the Pareto front of the
    rest; points are numbered and named in a legend, so labels never overlap. False when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, seen = [], set()
    for rep in reports:
        for r in rep["rows"]:
            if r.get("perplexity") is None:
                continue
            role = r.get("role") or ("input" if r["artifact"] == "input" else "llmopt")
            name = r.get("label") or r["artifact"]
            label = f"input model ({r.get('path')})" if role == "input" else name
            if role == "llmopt" and len(reports) > 1:
                label = f"{rep.get('output')}: {name}"
            if label in seen:  # the input model (and a shared baseline) appear in every report: once
                continue
            seen.add(label)
            size = r["size_bytes"] / 2**20 if r.get("size_bytes") else None
            pts.append({"label": label, "role": role, "size": size, "speed": r.get("decode_tok_s"),
                        "ppl": r["perplexity"]})  # fmt: skip
    if not pts:
        return False
    style = {
        "input": dict(marker="*", s=180, color="black"),
        "baseline": dict(marker="D", s=70, color="tab:gray"),
        "llmopt": dict(marker="o", s=60),
    }
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    handles = {}
    for ax, key, xlabel, better in (
        (axes[0], "size", "size on disk (MiB)", "left"),
        (axes[1], "speed", "decode tokens/s (this machine)", "right"),
    ):
        sub = [p for p in pts if p[key] is not None]
        if not sub:
            ax.text(0.5, 0.5, f"no {xlabel.split(' (')[0]} measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        for k, p in enumerate(pts):
            if p["role"] in ("input", "baseline"):  # reference lines on both panels, measured x or not
                ax.axhline(p["ppl"], color=style[p["role"]]["color"], ls=":", lw=1, zorder=1)
            if p[key] is None:
                continue
            st = dict(style[p["role"]])
            if p["role"] == "llmopt":
                st["color"] = colors[k % len(colors)]
            h = ax.scatter([p[key]], [p["ppl"]], zorder=3, label=f"{k + 1}. {p['label']}", **st)
            handles.setdefault(p["label"], h)
            ax.annotate(str(k + 1), (p[key], p["ppl"]), textcoords="offset points", xytext=(6, 5), fontsize=9)
        for k, ref in enumerate(pts):  # a reference without this x (the input's size): its line, named at the edge
            if ref[key] is None and ref["role"] in ("input", "baseline"):
                ax.annotate(f"{k + 1}. {ref['label']}", (0.01, ref["ppl"]), xycoords=("axes fraction", "data"),
                            textcoords="offset points", xytext=(0, 3), fontsize=8)  # fmt: skip
        rest = [p for p in sub if p["role"] != "input"]
        front = pareto([(p[key] if key == "size" else -p[key], p["ppl"]) for p in rest])
        fx = sorted((p[key], p["ppl"]) for p, f in zip(rest, front) if f)
        if len(fx) > 1:
            ax.plot([x for x, _ in fx], [y for _, y in fx], "--", color="tab:red", lw=1, zorder=2)
        # a readable range: every point with a margin of at least 2% of the best perplexity, never a zoom onto a
        # sliver that makes equal models look far apart
        ys = [p["ppl"] for p in sub] + [p["ppl"] for p in pts if p["role"] in ("input", "baseline")]
        lo, hi = min(ys), max(ys)
        pad = max(0.08 * (hi - lo), 0.02 * lo)
        ax.set_ylim(lo - pad, hi + pad)
        xs = [p[key] for p in sub]
        xpad = max(0.08 * (max(xs) - min(xs)), 0.05 * max(xs))
        ax.set_xlim(max(0.0, min(xs) - xpad), max(xs) + xpad)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title(f"perplexity vs {xlabel.split(' (')[0]} (better: down and {better})")
        ax.grid(alpha=0.3)
    fig.legend(handles.values(), [h.get_label() for h in handles.values()], loc="lower center",
               ncol=min(3, len(handles)), fontsize=8, frameon=False)  # fmt: skip
    rows_of_legend = -(-len(handles) // 3)
    fig.tight_layout(rect=(0, 0.05 + 0.04 * rows_of_legend, 1, 1))
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return True


def write_report_files(report: dict, folder: Path) -> None:
    """report.json, report.md and report.png, each written atomically."""
    from llmopt.outputs import atomic_output, write_text

    write_text(folder / REPORT_JSON, json.dumps(report, indent=1))
    write_text(folder / REPORT_MD, report_markdown(report))
    if any(r.get("perplexity") is not None for r in report["rows"]):  # evaluated: something to plot
        with atomic_output(folder / REPORT_PNG, overwrite=True, kind="file") as tmp:
            plot_reports([report], tmp)


def load_report(folder: str | Path) -> dict:
    p = Path(folder)
    f = p / REPORT_JSON if p.is_dir() else p
    if not f.is_file():
        raise LLMOptError(
            f"{folder} has no {REPORT_JSON}: make one with `llmopt compress ... --eval` (writes OUTPUT/{REPORT_JSON})"
        )
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LLMOptError(f"cannot read {f}: {e}") from None
    if not isinstance(d, dict) or d.get("kind") != REPORT_KIND or not isinstance(d.get("rows"), list):
        raise LLMOptError(f"{f} is not an llmopt run report (no kind: {REPORT_KIND})")
    return d


def compare(folders: list[str], output: str | None = None) -> tuple[str, str | None]:
    """``llmopt report``: the markdown table of every run's rows (input model once, first) and the plot
    written to ``output`` (default ``llmopt-report.png`` in the current folder). Returns (table, png)."""
    from llmopt.outputs import atomic_output, preflight

    reports = [load_report(f) for f in folders]
    for f, rep in zip(folders, reports):  # a run is named by its folder as given (it may have been moved)
        p = Path(f)
        rep["output"] = (p if p.is_dir() else p.parent).resolve().name
    rows, input_seen = [], set()
    for rep in reports:
        for r in table_rows(rep):
            if r[0] == "(input model)":
                key = (r[1], r[5])
                if key in input_seen:
                    continue
                input_seen.add(key)
                rows.insert(0, r)
            else:
                rows.append(r)
    table = markdown_table(HEADER, rows)
    if not any(r.get("perplexity") is not None for rep in reports for r in rep["rows"]):
        return table, None  # runs without --eval: nothing to plot
    png = Path(output or "llmopt-report.png")
    preflight(png, overwrite=True, kind="file", flag="--output")
    with atomic_output(png, overwrite=True, kind="file", flag="--output") as tmp:
        plot_reports(reports, tmp)
    return table, str(png)
