"""Tensor files: safetensors with a string->string header, at any URI.

Every weights file talora writes (SAM bases, hypernets, adapters, checkpoints) goes through here,
so each is one PUT on object storage and one atomic replace on local disk.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as _load
from safetensors.torch import save as _save

from talora.io.storage import StorageOptions, read_bytes, write_bytes

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on the JSON header


def parse_safetensors(data: bytes, uri: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of safetensors bytes; anything else is an error naming `uri`."""
    try:
        # The format: 8-byte little-endian header length, a JSON header, then the tensor bytes.
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        return _load(data), metadata
    except Exception as e:
        raise ValueError(f"{uri} is corrupt or not a safetensors file: {type(e).__name__}: {e}") from e


def read_shapes(uri: str, storage: StorageOptions | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as meta tensors (names and shapes, no data), from its header
    alone: two ranged reads, whatever the file's size."""
    try:
        header_len = int.from_bytes(read_bytes(uri, storage, 0, 8), "little")
        if not 2 <= header_len <= MAX_HEADER_BYTES:
            raise ValueError(f"a header of {header_len} bytes")
        header = json.loads(read_bytes(uri, storage, 8, 8 + header_len))
        header.pop("__metadata__", None)
        return {name: torch.empty(entry["shape"], device="meta") for name, entry in header.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{uri} is corrupt or not a safetensors file: {type(e).__name__}: {e}") from e


def read_weights(uri: str, storage: StorageOptions | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return parse_safetensors(read_bytes(uri, storage), uri)


def write_weights(
    uri: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
    storage: StorageOptions | None = None,
) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_bytes(uri, _save(state, metadata=metadata), storage)
