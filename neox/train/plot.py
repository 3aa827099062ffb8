"""The loss-curve picture written to each run directory."""
from __future__ import annotations

from pathlib import Path

from neox.train.metrics import read_metrics


def plot_losses(run_dir: Path, reference: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / "metrics.jsonl")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, label in (("train/loss", "train"), ("valid/loss", "validation")):
        points = sorted({r["step"]: r[key] for r in records if key in r}.items())
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key.startswith("valid") else None, markersize=3)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", label="unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
