"""Pictures: training curves from a run's metrics.jsonl."""

from __future__ import annotations

import io
import json

from talora.storage import StorageOptions, join, read_bytes, write_bytes


def plot_run(run_uri: str, out: str | None = None, storage: StorageOptions | None = None) -> str:
    """Loss curves and validation mIoU per group, as a PNG (default: RUN/curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = [json.loads(line) for line in read_bytes(join(run_uri, "metrics.jsonl"), storage).splitlines() if line]
    if not history:
        raise ValueError(f"{run_uri}/metrics.jsonl has no rows")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "loss_semantic", "loss_points", "loss_presence"):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            left.plot(*zip(*points), label=key, linewidth=1.2 if key == "loss" else 0.8)
    left.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
    left.legend()
    for key in sorted({k for h in history for k in h if k.startswith("val_")}):
        points = [(h["step"], h[key]) for h in history if key in h]
        right.plot(*zip(*points), marker="o", label=key.removeprefix("val_"))
    right.set(xlabel="step", ylabel="task mIoU", title="validation", ylim=(0, 1))
    if right.lines:
        right.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    out = out or join(run_uri, "curves.png")
    write_bytes(out, buffer.getvalue(), storage)
    return out
