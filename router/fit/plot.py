"""The accuracy-cost picture of `frugal cascade eval --plot`: the frontier, single models, the chosen
cascade, and a published reference curve where one exists."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from router.fit.reference import ReferencePoint
from router.tiers import CascadePoint


def plot_frontier(path: str | Path, title: str, frontier: Sequence[CascadePoint], singles: Sequence[CascadePoint],
                  chosen: CascadePoint, reference: Sequence[ReferencePoint] = (), reference_label: str = "",
                  extra_reference: Sequence[ReferencePoint] = (), extra_label: str = "") -> Path:
    import matplotlib  # noqa: PLC0415
    import matplotlib.ticker  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7.5, 5))
    ordered = sorted(frontier, key=lambda p: p.cost_usd)
    ax.plot([p.cost_usd for p in ordered], [p.accuracy for p in ordered], "-o", ms=3, color="tab:blue",
            label="Frugal frontier (fitted on train, shown on this split)")
    for single in singles:
        ax.scatter(single.cost_usd, single.accuracy, marker="s", color="tab:gray", zorder=3)
        ax.annotate(single.models[0].split("/")[-1], (single.cost_usd, single.accuracy), fontsize=7,
                    xytext=(3, -9), textcoords="offset points")
    ax.scatter(chosen.cost_usd, chosen.accuracy, marker="*", s=180, color="tab:red", zorder=4,
               label="chosen cascade: " + " → ".join(m.split("/")[-1] for m in chosen.models))
    if reference:
        ref = sorted(reference, key=lambda p: p.cost_usd)
        ax.plot([p.cost_usd for p in ref], [p.accuracy for p in ref], "--", color="tab:orange", label=reference_label)
    if extra_reference:
        ax.scatter([p.cost_usd for p in extra_reference], [p.accuracy for p in extra_reference], marker="x",
                   color="tab:green", label=extra_label)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("mean cost per query (USD, log scale)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
