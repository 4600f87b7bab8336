"""The loss curve written into the output folder: ``distill_curve.json`` and ``distill_curve.png``."""

from __future__ import annotations

import io
import json

CURVE_JSON = "distill_curve.json"
CURVE_PNG = "distill_curve.png"


def curve_files(curve: dict, title: str) -> dict[str, bytes]:
    """{file name: bytes}: the curve as JSON (``train``: per step tokens, loss, its parts, lr;
    ``heldout``: per evaluation tokens, loss, KL at T = 1) and a plot of both against tokens."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    train, held = curve.get("train", []), curve.get("heldout", [])
    if train:
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.6, label="train loss")
    if held:
        x = [r["tokens"] for r in held]
        ax.plot(x, [r["loss"] for r in held], "o-", lw=1.5, label="held-out loss")
        ax.plot(x, [r["kl"] for r in held], "s--", lw=1.2, label="held-out KL (T=1)")
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return {CURVE_JSON: json.dumps(curve, indent=1).encode(), CURVE_PNG: buf.getvalue()}
