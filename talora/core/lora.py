"""LoRA for a frozen SAM: a per-row LoRA Linear, adapters, merge and unmerge (targets come from the backbone).

Shapes: P = rows of a batch (prompt rows in the decoder, (image, prompt) rows in the encoder
tail), r = rank, in/out = a target Linear's features, N = everything between the row axis and the
feature axis (tokens, windows, pixels).

A wrapped Linear computes ``base(x) + s * (x A^T) B^T``. Its adapter is either shared (A: (r, in),
B: (out, r)) or one per row (A: (P, r, in), B: (P, out, r)), so one batch can mix tasks. A per-row
adapter can also be grouped: P adapters over n >= P rows in P runs (many point prompts of a few
tasks); each run then goes through one Linear with W + s B A, built for the call. Adapters
are set only inside `use_adapter(...)` and cleared when it exits: no state outlives a call. A
shared adapter can instead be merged into the weights (W += s B A) and unmerged exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class LoraTarget:
    """One adapted Linear, found on the model by its backbone (talora.backbones)."""

    name: str  # module path inside the SAM, e.g. "mask_decoder.transformer.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    component: str  # image_encoder | mask_decoder | output_mlps | iou_head
    depth: int  # layer position in the adapted stack: tail blocks first, then decoder layers
    module_type: str  # e.g. "encoder.attn.qkv", "decoder.cross_attn_token_to_image.q_proj"
    row_dim: int = 0  # the axis of the Linear's input that holds the P rows (1 where a model runs sequence-first)


@dataclass
class Adapter:
    """LoRA weights by target name: shared (A: (r, in), B: (out, r)) or per row ((P, r, in), (P, out, r))."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float  # alpha / rank
    # Grouped: rows groups[p]:groups[p + 1] of a batch use row p (P + 1 bounds); None = row i is row i.
    groups: tuple[int, ...] | None = None

    @property
    def num_rows(self) -> int | None:
        """P for a per-row adapter, None for a shared one."""
        a, _ = next(iter(self.weights.values()))
        return a.shape[0] if a.dim() == 3 else None

    @property
    def rank(self) -> int:
        a, _ = next(iter(self.weights.values()))
        return a.shape[-2]

    def row(self, i: int) -> Adapter:
        """Row `i` of a per-row adapter, as a shared adapter."""
        return Adapter({n: (a[i], b[i]) for n, (a, b) in self.weights.items()}, self.scale)

    def select(self, index: torch.Tensor | list[int]) -> Adapter:
        """Rows `index` of a per-row adapter (a row may repeat): (P, ...) -> (len(index), ...)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return Adapter({n: (a[index], b[index]) for n, (a, b) in self.weights.items()}, self.scale)

    def grouped(self, rows: torch.Tensor) -> Adapter:
        """This per-row adapter for a batch whose row i uses adapter row rows[i], `rows` sorted: the
        same outputs as select(rows), without a copy per row (inference only: no LoRA dropout)."""
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        if len(rows) > 1 and bool((rows[1:] < rows[:-1]).any()):
            raise ValueError("grouped() needs sorted rows; use select()")
        bounds = torch.searchsorted(rows, torch.arange(self.num_rows + 1)).tolist()
        return Adapter(self.weights, self.scale, tuple(bounds))

    def expand(self, num_rows: int) -> Adapter:
        """A shared adapter as `num_rows` identical rows (views, no copy)."""
        if self.num_rows is not None:
            raise ValueError("expand() takes a shared adapter; this one is already per row")
        return Adapter(
            {n: (a.expand(num_rows, *a.shape), b.expand(num_rows, *b.shape)) for n, (a, b) in self.weights.items()},
            self.scale,
        )

    @staticmethod
    def stack(adapters: list[Adapter]) -> Adapter:
        """Shared adapters -> one per-row adapter, row i = adapters[i]."""
        names = adapters[0].weights.keys()
        if any(a.weights.keys() != names or a.scale != adapters[0].scale for a in adapters):
            raise ValueError("Adapter.stack needs adapters with the same targets and scale")
        return Adapter(
            {n: (torch.stack([a.weights[n][0] for a in adapters]), torch.stack([a.weights[n][1] for a in adapters]))
             for n in names},
            adapters[0].scale,
        )

    def to(self, *args, **kwargs) -> Adapter:
        return Adapter({n: (a.to(*args, **kwargs), b.to(*args, **kwargs)) for n, (a, b) in self.weights.items()},
                       self.scale)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A for a shared adapter's target `name`: (out, in)."""
        a, b = self.weights[name]
        return self.scale * (b @ a)


class LoraLinear(nn.Module):
    """A frozen `base_layer` plus the adapter set by `use_adapter`, per row or shared."""

    def __init__(self, base_layer: nn.Linear, dropout: float = 0.0, row_dim: int = 0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.row_dim = row_dim
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A: torch.Tensor | None = None  # set only inside use_adapter
        self.lora_B: torch.Tensor | None = None
        self.lora_groups: tuple[int, ...] | None = None
        self.scale = 1.0
        self.merged_delta: torch.Tensor | None = None  # what merge() added, for an exact unmerge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_groups is not None:  # its own Linear per run of rows: no base pass first
            return self.grouped_forward(x, self.lora_A, self.lora_B, self.lora_groups)
        out = self.base_layer(x)
        if self.lora_A is None:
            return out
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        x = self.lora_dropout(x)
        if A.dim() == 2:  # shared: (r, in), (out, r)
            return out + self.scale * ((x @ A.T) @ B.T)
        # Per row. The leading axis of x is P, or a P-major multiple of P where SAM's windowed
        # attention folded windows into the batch; either way a view gives (P, N, in). A
        # sequence-first input (row_dim 1: (N, P, in)) is moved to that layout and back.
        num_rows = A.shape[0]
        if self.row_dim:
            x = x.movedim(self.row_dim, 0)
        if x.shape[0] % num_rows or (self.row_dim and x.shape[0] != num_rows):
            raise ValueError(f"batch of {x.shape[0]} does not split into {num_rows} adapter rows")
        xr = x.reshape(num_rows, -1, self.in_features)  # (P, N, in)
        delta = torch.bmm(torch.bmm(xr, A.transpose(1, 2)), B.transpose(1, 2))  # (P, N, r) -> (P, N, out)
        delta = delta.reshape(*x.shape[:-1], self.out_features)
        return out + self.scale * (delta.movedim(0, self.row_dim) if self.row_dim else delta)

    def grouped_forward(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, groups: tuple[int, ...]) -> torch.Tensor:
        """Each run of rows groups[p]:groups[p + 1] (times the P-major fold, as above) through one
        Linear with W + s B_p A_p, written straight into its slice of the output: about the cost of
        the base Linear alone, where base + per-row delta costs twice that."""
        if self.training:
            raise RuntimeError("a grouped adapter is for inference (it has no LoRA dropout)")
        if self.row_dim:
            raise ValueError("a grouped adapter needs the rows on the input's first axis")
        if x.shape[0] % groups[-1]:
            raise ValueError(f"batch of {x.shape[0]} does not split into the adapter's {groups[-1]} grouped rows")
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        base = self.base_layer
        weight = torch.baddbmm(base.weight.to(dtype).expand(A.shape[0], -1, -1), B.to(dtype), A.to(dtype),
                               alpha=self.scale)  # (P, out, in)
        bias = None if base.bias is None else base.bias.to(dtype)
        flat_x = x.reshape(-1, self.in_features).to(dtype)
        flat_out = torch.empty(flat_x.shape[0], self.out_features, dtype=dtype, device=x.device)
        per_row = flat_x.shape[0] // groups[-1]  # flattened positions per batch row
        for p, (start, end) in enumerate(zip(groups[:-1], groups[1:])):
            rows = slice(start * per_row, end * per_row)
            if end == start:
                continue
            if bias is None:
                torch.mm(flat_x[rows], weight[p].T, out=flat_out[rows])
            else:
                torch.addmm(bias, flat_x[rows], weight[p].T, out=flat_out[rows])
        return flat_out.view(*x.shape[:-1], self.out_features)

    def merge(self, delta: torch.Tensor, safe_merge: bool = True) -> None:
        """W += delta (out, in). With `safe_merge`, a non-finite result is refused before W changes."""
        if self.merged_delta is not None:
            raise RuntimeError("an adapter is already merged; unmerge() it first")
        weight = self.base_layer.weight
        delta = delta.to(weight.dtype)
        if safe_merge and not torch.isfinite(weight + delta).all():
            raise ValueError("merging this adapter gives non-finite weights; refused")
        with torch.no_grad():
            weight.add_(delta)
        self.merged_delta = delta.detach().clone()

    def unmerge(self) -> None:
        if self.merged_delta is None:
            return
        with torch.no_grad():
            self.base_layer.weight.sub_(self.merged_delta)
        self.merged_delta = None


def inject_lora(sam: nn.Module, targets: list[LoraTarget], dropout: float = 0.0) -> dict[str, LoraLinear]:
    """Wraps every target Linear of `sam` in a LoraLinear (idempotent); returns them by name."""
    sam.__dict__.pop(_LAYERS, None)
    layers = {}
    for t in targets:
        module = sam.get_submodule(t.name)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module, dropout, t.row_dim)
            parent, _, leaf = t.name.rpartition(".")
            setattr(sam.get_submodule(parent), leaf, module)
        layers[t.name] = module
    return layers


def remove_lora(sam: nn.Module) -> None:
    """Puts every wrapped Linear back (unmerging first), leaving `sam` exactly as before injection."""
    sam.__dict__.pop(_LAYERS, None)
    for name, module in list(sam.named_modules()):
        if isinstance(module, LoraLinear):
            module.unmerge()
            parent, _, leaf = name.rpartition(".")
            setattr(sam.get_submodule(parent), leaf, module.base_layer)


_LAYERS = "_talora_lora_layers"  # lora_layers' answer, kept on the module until inject/remove_lora change it


def lora_layers(sam: nn.Module) -> dict[str, LoraLinear]:
    """`sam`'s LoRA layers by name (walked once: use_adapter runs several times per image)."""
    layers = sam.__dict__.get(_LAYERS)
    if layers is None:
        layers = sam.__dict__[_LAYERS] = {name: m for name, m in sam.named_modules() if isinstance(m, LoraLinear)}
    return layers


@contextmanager
def use_adapter(sam: nn.Module, adapter: Adapter | None) -> Iterator[None]:
    """Applies `adapter` to `sam`'s LoRA layers for the duration of the block (None = base model)."""
    if adapter is None:
        yield
        return
    layers = lora_layers(sam)
    missing = sorted(set(adapter.weights) - set(layers))
    if missing:
        raise KeyError(f"adapter has targets the model has no LoRA layer for: {missing[:5]}")
    try:
        for name, (a, b) in adapter.weights.items():
            layer = layers[name]
            if a.shape[-1] != layer.in_features or b.shape[-2] != layer.out_features:
                raise ValueError(
                    f"adapter target {name}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                    f"Linear({layer.in_features}, {layer.out_features})"
                )
            # Plain attributes, set past nn.Module.__setattr__'s checks (this runs per layer and call).
            layer.__dict__.update(lora_A=a, lora_B=b, scale=adapter.scale, lora_groups=adapter.groups)
        yield
    finally:
        for layer in layers.values():
            layer.__dict__.update(lora_A=None, lora_B=None, lora_groups=None)


def merge_adapter(sam: nn.Module, adapter: Adapter, safe_merge: bool = True) -> None:
    """Merges a shared adapter into the weights (single-task inference): W += s B A per target."""
    if adapter.num_rows is not None:
        raise ValueError("only a shared adapter can be merged; take adapter.row(i)")
    layers = lora_layers(sam)
    deltas = {name: adapter.delta_weight(name) for name in adapter.weights}
    if safe_merge:  # all or nothing: check every target before any weight changes
        for name, delta in deltas.items():
            if not torch.isfinite(layers[name].base_layer.weight + delta.to(layers[name].base_layer.weight)).all():
                raise ValueError(f"merging the adapter gives non-finite weights at {name}; refused")
    for name, delta in deltas.items():
        layers[name].merge(delta, safe_merge=False)


def unmerge_adapter(sam: nn.Module) -> None:
    for layer in lora_layers(sam).values():
        layer.unmerge()
