"""Pictures: training curves from a run's metrics.jsonl."""

from __future__ import annotations

import json

import numpy as np
from pycocotools import mask as mask_utils

from talora.batch.rows import read_run, read_summary
from talora.io.images import decode_image, figure_png, pyplot
from talora.io.storage import StorageOptions, join, read_bytes, write_bytes


def plot_run(run_uri: str, out: str | None = None, storage: StorageOptions | None = None) -> str:
    """Loss curves and validation mIoU per group, as a PNG (default: RUN/curves.png)."""
    plt = pyplot()

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
    out = out or join(run_uri, "curves.png")
    write_bytes(out, figure_png(fig), storage)
    return out


_COLORS = [(0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.4, 0.74)]


def overlay_png(image, detections_by_prompt: dict[str, list]) -> bytes:
    """The original and one overlay per prompt, side by side, as PNG bytes.

    `detections_by_prompt`: {prompt: [{"kind", "segmentation": {"size", "counts"}, "score"}, ...]}
    (prediction rows or predictor Detections as dicts). Semantic masks are tinted, instances outlined.
    """
    plt = pyplot()
    panels = 1 + len(detections_by_prompt)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4), squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("image", fontsize=9)
    for ax, (prompt, detections) in zip(axes[0, 1:], detections_by_prompt.items()):
        ax.imshow(image)
        tint = np.zeros((*image.shape[:2], 4))
        instances = 0
        for d in detections:
            seg = d["segmentation"]
            mask = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
            if d["kind"] == "semantic":
                tint[mask] = (1.0, 0.0, 1.0, 0.45)
            elif d["kind"] == "instance":
                color = _COLORS[instances % len(_COLORS)]
                ax.contour(mask, levels=[0.5], colors=[color], linewidths=1.2)
                instances += 1
        ax.imshow(tint)
        ax.set_title(f"{prompt}\n{instances} instance(s)", fontsize=9)
    for ax in axes[0]:
        ax.axis("off")
    return figure_png(fig)


def render_predictions(predictions: str, out_dir: str, prompts: list[str] | None = None, max_images: int = 20,
                       storage: StorageOptions | None = None, images: str | None = None) -> list[str]:
    """One overlay PNG per image of a labelling run (committed rows only); returns the files.

    Images are read from the rows' URIs, or from `images` (the prefix the job labelled, e.g. a
    local copy of the bucket): ``images/<shard>/<name>``, or ``images/<name>`` for virtual shards."""
    run = read_run(predictions, storage)
    prompts = prompts or read_summary(predictions, storage).get("prompts") or None
    by_image: dict[str, dict[str, list]] = {uri: {} for uri in run.processed}  # images without rows too
    shard_of = run.shard_of
    for row in run.table.to_pylist():
        if row["kind"] == "error" or (prompts and row["prompt"] not in prompts):
            continue
        by_image.setdefault(row["image_uri"], {}).setdefault(row["prompt"], []).append(row)
    written = []
    for uri in sorted(by_image)[:max_images]:
        grouped = by_image[uri]
        ordered = {p: grouped.get(p, []) for p in (prompts or sorted(grouped))}
        base = uri.rstrip("/").rsplit("/", 1)[-1]
        source = uri
        if images:
            shard = shard_of[uri]
            source = join(images, base) if shard.startswith("virtual-") else join(images, shard, base)
        image = decode_image(read_bytes(source, storage))
        name = base.rsplit(".", 1)[0] + ".png"
        target = join(out_dir, name)
        write_bytes(target, overlay_png(image, ordered), storage)
        written.append(target)
    return written
