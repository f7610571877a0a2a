"""Train a task hypernetwork (or a static LoRA) on Ray Train.

    ray job submit --working-dir . -- python jobs/train_hypernet.py --config configs/demo_cpu.yaml \\
        --num-workers 2 --storage-path s3://bucket/runs --name demo

Flags override the YAML. Relaunching the same --name and --storage-path resumes from the last
checkpoint; a changed config is refused. Writes <storage-path>/<name>/summary.json and
metrics.jsonl; exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import json
import sys

from talora.batch.cluster import init_ray
from talora.cli.common import add_storage_flags, run_main, storage_from_args
from talora.backbones.variants import SAM_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML with `model` and `train` sections (strict)")
    p.add_argument("--mode", choices=("hypernet", "static", "pretrain"))
    p.add_argument("--adapter-type", choices=("lora", "tucker"), help="hypernet adapters: per-target A,B or TA-LoRA cores")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--use-gpu", action="store_true", default=None)
    p.add_argument("--amp", action="store_true", default=None, help="autocast (fp16 + GradScaler unless --amp-dtype)")
    p.add_argument("--amp-dtype", choices=("float16", "bfloat16"), help="bfloat16 on A100/H100 (no overflow, no scaler)")
    p.add_argument("--storage-path", help="checkpoints and metrics: local path or URI")
    p.add_argument("--name", help="run name; the same name + storage path resumes")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate for the global batch (train.lr)")
    p.add_argument("--val-every", type=int)
    p.add_argument("--max-failures", type=int)
    p.add_argument("--embeddings", help="embedding cache run URI (from jobs/embed_images.py)")
    p.add_argument("--train-annotations")
    p.add_argument("--val-annotations")
    p.add_argument("--task", help="static mode: one task id (default: every object)")
    p.add_argument("--sam-type", choices=SAM_TYPES, help="the SAM variant (a checkpoint of another one is refused)")
    p.add_argument("--sam-checkpoint", help="the base SAM (path or URI); pretrain mode: the starting point")
    p.add_argument("--ray-address", default=None)
    add_storage_flags(p)
    return p


def overrides_from_args(args: argparse.Namespace) -> dict:
    train_flags = ("mode", "num_workers", "cpus_per_worker", "use_gpu", "amp", "amp_dtype", "storage_path", "name",
                   "max_steps", "lr", "val_every", "max_failures", "embeddings", "train_annotations", "val_annotations",
                   "task")
    overrides: dict = {"train": {k: getattr(args, k) for k in train_flags if getattr(args, k) is not None}}
    if args.adapter_type:
        overrides.setdefault("model", {})["hypernet"] = {"adapter_type": args.adapter_type}
    sam = {k: v for k, v in (("sam_type", args.sam_type), ("checkpoint", args.sam_checkpoint)) if v is not None}
    if sam:
        overrides.setdefault("model", {})["sam"] = sam
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    storage = storage_from_args(args)

    def job() -> int:
        from talora.data.synthetic import ensure_demo_dataset
        from talora.io.storage import read_bytes
        from talora.train.config import load_run_spec
        from talora.train.trainer import run_training

        spec = load_run_spec(read_bytes(args.config, storage).decode(), overrides_from_args(args))
        for split in (spec.train.train_annotations, spec.train.val_annotations):
            ensure_demo_dataset(split)  # the repository's demo data, generated the first time
        init_ray(args.ray_address)
        summary = run_training(spec, storage)
        print(json.dumps({k: summary[k] for k in ("run", "seconds", "final_metrics", "best_checkpoint")}, default=str))
        return 0

    return run_main("train_hypernet", job, storage)


if __name__ == "__main__":
    sys.exit(main())
