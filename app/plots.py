"""PNG plots for the CLI and benchmarks (matplotlib, from the ``plots`` extra; imported only when a plot is drawn)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def overlap_heatmap(
    panels: Sequence[tuple[str, dict[str, Any]]], path: str | Path, metric: str = "containment", dpi: int = 110
) -> Path:
    """One heatmap per (title, overlap report) side by side: cell [i][j] = ``report[metric][i][j]``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("plots need matplotlib (a dependency of skillgraft): pip install matplotlib") from exc
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 0.8, 4.4), squeeze=False)
    image = None
    for ax, (title, report) in zip(axes[0], panels, strict=True):
        names = report["tasks"]
        values = [[float("nan") if v is None else v for v in row] for row in report[metric]]
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                if value == value:  # not NaN
                    ax.text(
                        j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k"
                    )
        ax.set_title(title, fontsize=10)
    label = {"containment": "|γi ∩ γj| / |γj|", "jaccard": "Jaccard", "sign_agreement": "sign agreement"}
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=label.get(metric, metric))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return target
