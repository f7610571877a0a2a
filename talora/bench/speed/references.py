"""What talora is measured against: the naive loop, the family's own predictor and, where it is
importable, segment-anything-fast."""

from __future__ import annotations

import numpy as np
import torch

from talora.bench.speed.config import PROMPTS, SpeedConfig
from talora.bench.timing import per_image
from talora.predict.predictor import PredictConfig, TaskAwarePredictor


def sam_reference(model, images: list[np.ndarray], resized, config: SpeedConfig) -> dict:
    """Seconds per image of the family's own predictor on the base (SamPredictor, SAM2ImagePredictor,
    Sam3Processor; LoRA inactive): set_image, then one point at the image centre, one mask (a
    detector: the first prompt as its text prompt, every instance it finds); beside talora's
    one-prompt semantic path on the same images and precision. vs_sam_predictor > 1: talora labels
    more images per second."""
    semantic = TaskAwarePredictor(model, PredictConfig(mode="semantic", precision=config.precision))
    sam = model.backbone.reference_predictor()
    detector = model.backbone.detector

    def sam_image(i: int) -> None:
        h, w = images[i].shape[:2]
        with torch.no_grad(), semantic.autocast():
            sam.set_image(images[i])
            if detector:
                sam.predict_text(PROMPTS[0])
            else:
                sam.predict(point_coords=np.array([[w / 2, h / 2]]), point_labels=np.array([1]),
                            multimask_output=False)

    sam_s = per_image(sam_image, len(images), config.min_run_time)
    talora_s = per_image(lambda i: semantic.predict_resized(*resized[i], [PROMPTS[0]]), len(images), config.min_run_time)
    return {"sam_predictor_s_per_image": sam_s, "talora_semantic_s_per_image": talora_s,
            "vs_sam_predictor": sam_s / talora_s}


def fast_reference(model, images: list[np.ndarray], config: SpeedConfig, reference: dict) -> dict:
    """Seconds per image of the family's fast predictor (`Backbone.fast_reference_predictor`: for SAM
    1, segment-anything-fast, which runs in bf16) with the same calls as `sam_reference`, beside
    talora's one-prompt semantic path at this run's precision; {"absent": why} where there is none."""
    if config.precision != "bf16":
        return {"absent": "the fast reference runs in bf16; see this suite's bf16 run"}
    fast, why_not = model.backbone.fast_reference_predictor()
    if fast is None:
        return {"absent": why_not}

    def fast_image(i: int) -> None:
        h, w = images[i].shape[:2]
        with torch.no_grad():
            fast.set_image(images[i])
            fast.predict(point_coords=np.array([[w / 2, h / 2]]), point_labels=np.array([1]), multimask_output=False)

    fast_s = per_image(fast_image, len(images), config.min_run_time)
    talora_s = reference["talora_semantic_s_per_image"]
    return {"fast_predictor_s_per_image": fast_s, "talora_semantic_s_per_image": talora_s,
            "vs_fast_predictor": fast_s / talora_s}


def naive_image(predictor, resized: np.ndarray, size: tuple[int, int], prompts: list[str]) -> None:
    """Per prompt: text encoder, hypernet, the whole encoder and the decoder, nothing shared or cached."""
    for prompt in prompts:
        predictor.model.forget_adapters()
        predictor.predict_resized(resized, size, [prompt])
