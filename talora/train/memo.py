"""A bounded, least-recently-used memo of per-image tensors (trunk features, pretraining inputs).

Training draws images at random, so each worker memoises what it computes once per image.
Unbounded, that grows with the dataset, and device memory is too small for it: vit_h trunk
features are 64 x 64 x 1280 fp32 = 21 MB an image (half that under fp16 autocast), so the T4
preset's 200 validation images alone would take 2-4 GB of its 16. Entries are kept in CPU memory
up to `max_bytes`; past it the least recently used are dropped and rebuilt when next drawn. A dataset much larger than the memo belongs in the
embedding cache (jobs/embed_images.py, `train.embeddings`), where the trunk runs once per image.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def tensor_bytes(value) -> int:
    """Bytes held by the tensors in `value` (a tensor, or tuples / lists / dicts / dataclasses of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    if dataclasses.is_dataclass(value):
        return sum(tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


class LruMemo(Generic[K, V]):
    """`memo(key)` = `build(key)`, kept while the entries' tensors fit in `max_bytes`.

    An entry larger than the whole budget is returned but not kept. `builds` counts entries built,
    `dropped` those evicted or never kept, so a caller can say when its memo has become a recompute."""

    def __init__(self, build: Callable[[K], V], max_bytes: int) -> None:
        self.build, self.max_bytes = build, max_bytes
        self.entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.nbytes = self.builds = self.dropped = 0

    def __call__(self, key: K) -> V:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key][0]
        value = self.build(key)
        self.builds += 1
        size = tensor_bytes(value)
        if size > self.max_bytes:
            self.dropped += 1
            return value
        while self.nbytes + size > self.max_bytes:
            _, (_, evicted) = self.entries.popitem(last=False)
            self.nbytes -= evicted
            self.dropped += 1
        self.entries[key] = (value, size)
        self.nbytes += size
        return value

    def __len__(self) -> int:
        return len(self.entries)

    def full_message(self, what: str) -> str:
        return (f"the {what} memo is full ({self.max_bytes / 2**30:.3g} GB = {len(self)} images, train.memo_gb): "
                "entries past it are rebuilt each time they are drawn")


class TrunkMemo(LruMemo[int, tuple[torch.Tensor, tuple[int, int]]]):
    """(trunk features (h, w, C), input size) per image id: computed on `device` once per worker (the
    trunk is frozen), kept in CPU memory up to `max_bytes`."""

    def __init__(self, model, dataset, storage, device: torch.device, max_bytes: int = 2**62) -> None:
        self.model, self.dataset, self.storage, self.device = model, dataset, storage, device
        super().__init__(self._build, max_bytes)

    @torch.no_grad()
    def _build(self, image_id: int) -> tuple[torch.Tensor, tuple[int, int]]:
        x, input_size = self.model.preprocess(self.dataset.load_image(image_id, self.storage))
        return self.model.embed_trunk(x[None].to(self.device))[0].cpu(), input_size
