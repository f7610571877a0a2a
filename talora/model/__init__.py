"""The task-aware SAM: a frozen backbone with adapters in its encoder tail and mask decoder
(`task_aware_sam`), building and loading it from checkpoints (`loading`), adapter files
(`files`) and their export to PEFT or a merged checkpoint (`peft`).

May import talora.io, core, backbones, adapters and config."""
