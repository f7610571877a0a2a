"""Scoring and inspection of committed runs: COCO metrics with pycocotools (`metrics`, `evaluate`),
linear probes of SAM features (`probe`), and overlays for a human to look at (`viz`).

May import talora.batch (rows), data, backbones and io; runs on one machine, without Ray."""
