"""Training on Ray Train: config, losses, batches, the per-worker loop, and the trainer."""
