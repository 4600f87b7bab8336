"""The loss curve written into the output folder: ``distill_curve.json`` and ``distill_curve.png``, and
what the held-out KL is called.

The held-out KL at T = 1 is the full-vocabulary KL only with a live teacher's full logits (``top_k:
null``). With cached top-k logits it is the KL between the k + 1 buckets (the teacher's k tokens and the
rest), which by the data-processing inequality is a lower bound of the KL: its key is ``kl_topk_bound``
and every place that shows it says "bound".
"""

from __future__ import annotations

import io
import json

CURVE_JSON = "distill_curve.json"
CURVE_PNG = "distill_curve.png"


def heldout_kl_key(top_k: int | None) -> str:
    """The held-out records' key of the KL at T = 1: ``kl`` (full logits) or ``kl_topk_bound``."""
    return "kl" if top_k is None else "kl_topk_bound"


def heldout_kl_label(top_k: int | None) -> str:
    return "held-out KL (T=1, full vocabulary)" if top_k is None else f"held-out top-{top_k} bucket KL bound (T=1)"


def curve_files(curve: dict, title: str, kl_label: str) -> dict[str, bytes]:
    """{file name: bytes}: the curve as JSON (``train``: per step tokens, loss, its parts, lr, the step's seconds;
    ``heldout``: per evaluation tokens, loss, the KL at T = 1 or its top-k bound; ``heldout_kl``: which,
    in words) and a plot of both against tokens."""
    curve = {**curve, "heldout_kl": kl_label}
    buf = io.BytesIO()
    figure(curve, title).savefig(buf, format="png")
    return {CURVE_JSON: json.dumps(curve, indent=1).encode(), CURVE_PNG: buf.getvalue()}


def figure(curve: dict, title: str):
    """The plot of a curve (with its ``heldout_kl`` label): train loss, held-out loss and KL (or bound)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    train, held = curve.get("train", []), curve.get("heldout", [])
    if train:
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.6, label="train loss")
    if held:
        x = [r["tokens"] for r in held]
        ax.plot(x, [r["loss"] for r in held], "o-", lw=1.5, label="held-out loss")
        key = "kl" if "kl" in held[0] else "kl_topk_bound"
        ax.plot(x, [r[key] for r in held], "s--", lw=1.2, label=curve["heldout_kl"])
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
