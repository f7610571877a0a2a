"""Adapter files: one prompt's LoRA as safetensors with a JSON header.

Tensors: ``<target>.lora_A`` (r, in) and ``<target>.lora_B`` (out, r). Header (``__metadata__``):
format, sam_type, rank, alpha, prompt, hypernet digest and the targets with their shapes, so a
file can be checked against a model before it is applied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from talora.lora import Adapter, LoraTarget
from talora.storage import StorageOptions
from talora.weights import read_weights, write_weights

ADAPTER_FORMAT = "talora.adapter/1"


@dataclass(frozen=True)
class AdapterHeader:
    sam_type: str
    rank: int
    alpha: float
    prompt: str
    hypernet_digest: str
    targets: list[dict]  # [{"name", "in_features", "out_features"}]


def save_adapter(uri: str, adapter: Adapter, header: AdapterHeader, storage: StorageOptions | None = None) -> None:
    """Writes a shared adapter (one prompt) to `uri`."""
    if adapter.num_rows is not None:
        raise ValueError("save_adapter takes one prompt's adapter; take adapter.row(i)")
    tensors = {}
    for name, (a, b) in adapter.weights.items():
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a, b
    metadata = {
        "format": ADAPTER_FORMAT,
        "sam_type": header.sam_type,
        "rank": str(header.rank),
        "alpha": repr(header.alpha),
        "prompt": header.prompt,
        "hypernet_digest": header.hypernet_digest,
        "targets": json.dumps(header.targets),
    }
    write_weights(uri, tensors, metadata, storage)


def load_adapter(
    uri: str,
    targets: list[LoraTarget] | None = None,
    sam_type: str | None = None,
    storage: StorageOptions | None = None,
) -> tuple[Adapter, AdapterHeader]:
    """Reads an adapter file; with `targets`/`sam_type`, checks it fits that model first."""
    tensors, meta = read_weights(uri, storage)
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{uri} is not a talora adapter file (format {meta.get('format')!r}, expected {ADAPTER_FORMAT!r})")
    try:
        header = AdapterHeader(
            sam_type=meta["sam_type"],
            rank=int(meta["rank"]),
            alpha=float(meta["alpha"]),
            prompt=meta["prompt"],
            hypernet_digest=meta["hypernet_digest"],
            targets=json.loads(meta["targets"]),
        )
    except (KeyError, ValueError) as e:
        raise ValueError(f"adapter {uri} has a broken header: {type(e).__name__}: {e}") from e
    if sam_type is not None and header.sam_type != sam_type:
        raise ValueError(f"adapter {uri} was made for {header.sam_type}, but the model is {sam_type}")

    weights = {}
    for t in header.targets:
        name = t["name"]
        try:
            a, b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        except KeyError as e:
            raise ValueError(f"adapter {uri}: header lists {name} but the file has no tensor {e}") from e
        if a.shape != (header.rank, t["in_features"]) or b.shape != (t["out_features"], header.rank):
            raise ValueError(
                f"adapter {uri}: {name} has A {tuple(a.shape)}, B {tuple(b.shape)}; header says rank "
                f"{header.rank}, Linear({t['in_features']}, {t['out_features']})"
            )
        weights[name] = (a, b)

    if targets is not None:
        known = {t.name: t for t in targets}
        for t in header.targets:
            model_t = known.get(t["name"])
            if model_t is None:
                raise ValueError(f"adapter {uri} targets {t['name']}, which this model does not adapt")
            if (model_t.in_features, model_t.out_features) != (t["in_features"], t["out_features"]):
                raise ValueError(
                    f"adapter {uri}: {t['name']} is Linear({t['in_features']}, {t['out_features']}) in the file "
                    f"but Linear({model_t.in_features}, {model_t.out_features}) in the model"
                )
    return Adapter(weights, header.alpha / header.rank), header
