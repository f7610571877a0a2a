"""Training on Ray Train: config, losses, task sampling, batches, the per-worker loop, the SAM
embedding cache job (`embed`), pretraining and the trainer.

May import talora.model, adapters, batch, eval (metrics), data, backbones, core, io and config;
never label, bench or cli."""
