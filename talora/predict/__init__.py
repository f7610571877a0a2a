"""Inference on one image: prompt in, masks, boxes and scores out (`predictor`).

May import talora.model and what it stands on."""
