"""Linear probes on frozen trunk features: does the base encode what tasks name?

A base can only be adapted to what its trunk encodes (docs/design.md). The probe takes the trunk's
feature at every embedding cell that lies inside an object (>= `min_coverage` of the cell), labels
it with that object's category, supercategory or colour, fits a multinomial logistic regression on
training images and reports accuracy on held-out images, beside the majority-class chance level.
The probe is fitted on thousands of images with weight decay, enough that its accuracy no longer
rises with more: a data-starved probe under-reads the features (on the demo base it reads 0.844
fitted on 512 images and saturates at 0.856 from 2048 on, where the pretraining's own linear head
reads the same; docs/results.md).

Shapes: h x w = the embedding grid, C = trunk channels, N = labelled cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from talora.backbones.base import Backbone
from talora.data.coco import CocoDataset, Instance
from talora.io.storage import StorageOptions

KEYS = ("category", "supercategory", "color")


def label_of(instance: Instance, key: str) -> str | None:
    if key == "category":
        return instance.category
    if key == "supercategory":
        return instance.supercategory
    return instance.attribute(key)


def cell_labels(instances: list[Instance], input_size: tuple[int, int], backbone: Backbone, grid: tuple[int, int],
                key: str, min_coverage: float = 0.5) -> dict[int, str]:
    """{flat cell index: label} for cells covered >= min_coverage by one object (the most covering)."""
    h, w = grid
    best: dict[int, tuple[float, str]] = {}
    for inst in instances:
        label = label_of(inst, key)
        if inst.iscrowd or label is None:
            continue
        mask = torch.from_numpy(inst.mask().astype(np.float32))[None, None]
        mask = backbone.to_model_frame(mask, input_size)  # (1, 1, S, S), as the image was placed
        coverage = F.adaptive_avg_pool2d(mask, (h, w))[0, 0].flatten()  # (h*w,)
        for cell in torch.nonzero(coverage >= min_coverage).flatten().tolist():
            if cell not in best or coverage[cell] > best[cell][0]:
                best[cell] = (float(coverage[cell]), label)
    return {cell: label for cell, (_, label) in best.items()}


@torch.no_grad()
def collect(backbone: Backbone, dataset: CocoDataset, image_ids: list[int], tail_blocks: int, keys=KEYS,
            storage: StorageOptions | None = None) -> dict[str, tuple[np.ndarray, list[str]]]:
    """{key: (N x C trunk features, N labels)} over the labelled cells of `image_ids`; the trunk runs
    once per image for every key."""
    features: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    labels: dict[str, list[str]] = {key: [] for key in keys}
    for image_id in image_ids:
        x, input_size = backbone.preprocess(dataset.load_image(image_id, storage))
        trunk = backbone.embed_trunk(x[None], tail_blocks)[0]  # (h, w, C)
        h, w, C = trunk.shape
        for key in keys:
            cells = cell_labels(dataset.instances[image_id], input_size, backbone, (h, w), key)
            if cells:
                order = sorted(cells)
                features[key].append(trunk.reshape(h * w, C)[torch.tensor(order)].float().numpy())
                labels[key] += [cells[c] for c in order]
    return {key: (np.concatenate(features[key]) if features[key] else np.zeros((0, 1), np.float32), labels[key])
            for key in keys}


@dataclass
class ProbeResult:
    key: str
    accuracy: float
    chance: float  # majority class share of the test cells
    train_cells: int
    test_cells: int
    classes: int


def linear_probe(x_train: np.ndarray, y_train: list[str], x_test: np.ndarray, y_test: list[str], key: str = "",
                 epochs: int = 300, lr: float = 0.05, weight_decay: float = 1e-2, seed: int = 0) -> ProbeResult:
    """Multinomial logistic regression (full batch, standardised features); test accuracy."""
    classes = sorted(set(y_train))
    if len(classes) < 2:
        raise ValueError(f"probe {key}: the training cells hold {len(classes)} class(es); need at least 2")
    index = {c: i for i, c in enumerate(classes)}
    torch.manual_seed(seed)
    xt = torch.as_tensor(x_train, dtype=torch.float32)
    mean, std = xt.mean(0), xt.std(0) + 1e-6
    xt = (xt - mean) / std
    yt = torch.tensor([index[c] for c in y_train])
    layer = torch.nn.Linear(xt.shape[1], len(classes))
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(layer(xt), yt).backward()
        optimizer.step()
    keep = [i for i, c in enumerate(y_test) if c in index]  # classes never trained on cannot be predicted
    xs = (torch.as_tensor(x_test[keep], dtype=torch.float32) - mean) / std
    ys = torch.tensor([index[y_test[i]] for i in keep])
    with torch.no_grad():
        accuracy = float((layer(xs).argmax(1) == ys).float().mean()) if keep else 0.0
    counts = np.bincount(ys.numpy(), minlength=len(classes)) if keep else np.zeros(1)
    return ProbeResult(key, accuracy, float(counts.max() / max(1, counts.sum())), len(y_train), len(keep), len(classes))


def probe_base(backbone: Backbone, train: CocoDataset, test: CocoDataset, tail_blocks: int, keys=KEYS, train_images: int = 2048,
               test_images: int = 100, storage: StorageOptions | None = None) -> list[ProbeResult]:
    """Probe accuracy per key: fit on the first `train_images` of `train`, score on the first
    `test_images` of `test`."""
    fitted = collect(backbone, train, train.image_ids[:train_images], tail_blocks, keys, storage)
    scored = collect(backbone, test, test.image_ids[:test_images], tail_blocks, keys, storage)
    results = []
    for key in keys:
        (x_train, y_train), (x_test, y_test) = fitted[key], scored[key]
        if not y_train or not y_test:
            continue  # the dataset has no such label (e.g. no colour attributes)
        results.append(linear_probe(x_train, y_train, x_test, y_test, key))
    return results
