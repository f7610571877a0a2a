"""Benchmarks: quality against the alternatives a user would pick, speed against the compute floor.

    python jobs/benchmark.py --suite speed [--images URI] [--num-images N] [--prompts K] \\
        [--device cpu|cuda] [--sam-type VARIANT] [--config PRESET] --out DIR
    python jobs/benchmark.py --suite quality --train-annotations URI --val-annotations URI \\
        [--sam-checkpoint URI] [--hypernet URI | --hypernet-steps S] \\
        [--oracle-tasks N | --oracle-task ID ...] [--oracle-steps S] [--val-images N] [--ablations] --out DIR
    python jobs/benchmark.py --suite scale [--shards S] [--images-per-shard N] [--small-shards S2] --out DIR

With no data flags both suites run on the demo domain with the shipped models (the speed suite
uses random weights of the real architecture for other variants). The quality suite trains its
oracles (and, given data but no --hypernet, a hypernet) with --config's training preset on a
local Ray, under DIR/train (a finished run of the same config is reused). The scale suite
generates buckets of empty files (default 10^6 and 10^4) and measures the labelling driver's
planning per shard, its memory and its time to the first committed shard on both. Each writes
DIR/results.json and DIR/results.md (speed and quality also a plot), with the machine recorded;
prints the Markdown. See talora.bench.speed, talora.bench.quality and talora.bench.scale for
what is measured.
"""

from __future__ import annotations

import argparse
import sys

import torch

from talora.bench import quality, scale, speed
from talora.cli.common import add_storage_flags, run_main, storage_from_args
from talora.io.storage import join, read_bytes
from talora.backbones.variants import DEFAULT_VARIANT, SAM_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=("speed", "quality", "scale"), default="speed")
    p.add_argument("--images", default=None, help="image prefix (default: demo images, generated)")
    p.add_argument("--num-images", type=int, default=None, help="images generated or listed (default 1000)")
    p.add_argument("--timed-images", type=int, default=None, help="images the model paths cycle through (default 16)")
    p.add_argument("--prompts", type=int, default=None, help="K prompts of the floor and naive paths (default 2)")
    p.add_argument("--points-per-side", type=int, default=None, help="instance grid (default 16, as the job's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sam-type", default=DEFAULT_VARIANT, choices=SAM_TYPES)
    p.add_argument("--config", help="a training preset. speed: its model (random weights) and batch for the train "
                   "step; quality: how oracles and hypernets are trained (default configs/demo_cpu.yaml)")
    p.add_argument("--batch-images", type=int, default=None, help="train step: images (default 8, or the preset's)")
    p.add_argument("--tasks-per-image", type=int, default=None, help="train step: tasks per image (default 2)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds of timed runs per path (default 2)")
    p.add_argument("--skip-job", action="store_true", help="no labelling job end to end (no Ray)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="speed: autocast of the timed model paths and the job (default fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    q = p.add_argument_group("quality suite")
    q.add_argument("--train-annotations", help="COCO JSON the tasks (and any training) come from (default: demo)")
    q.add_argument("--val-annotations", help="COCO JSON everything is scored on")
    q.add_argument("--sam-checkpoint", help="the frozen base (default: the one the hypernet names)")
    q.add_argument("--hypernet", help="the hypernet scored (default: shipped on the demo domain, else trained)")
    q.add_argument("--hypernet-steps", type=int, help="train the hypernet for S steps (default 3000 when trained)")
    q.add_argument("--oracle-tasks", type=int, default=6, help="static-LoRA oracles, drawn across task kinds")
    q.add_argument("--oracle-task", action="append", default=[], help="an oracle task id (repeatable)")
    q.add_argument("--oracle-steps", type=int, default=1000, help="training steps per oracle")
    q.add_argument("--oracle-lr", type=float, default=1e-3, help="oracle learning rate (0: the preset's)")
    q.add_argument("--val-images", type=int, default=40, help="validation images scored")
    q.add_argument("--ablations", action="store_true", help="also train and score the ablation hypernets")
    q.add_argument("--ablation-steps", type=int, help="steps per ablation hypernet (default --hypernet-steps or 1000)")
    q.add_argument("--seed", type=int, default=0, help="oracle draw and random-text pairing")
    g = p.add_argument_group("scale suite")
    g.add_argument("--shards", type=int, default=1000, help="shard folders of the large bucket")
    g.add_argument("--images-per-shard", type=int, default=1000, help="empty files per shard")
    g.add_argument("--small-shards", type=int, default=10, help="shard folders of the small bucket")
    p.add_argument("--out", default="runs/bench", help="output folder (path or URI)")
    add_storage_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    storage = storage_from_args(args)

    def job() -> int:
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.suite == "quality":
            preset = read_bytes(args.config or "configs/demo_cpu.yaml", storage).decode()
            config = quality.QualityConfig(
                preset, args.train_annotations, args.val_annotations, args.sam_checkpoint, args.hypernet,
                args.hypernet_steps, args.oracle_tasks, tuple(args.oracle_task), args.oracle_steps,
                oracle_lr=args.oracle_lr or None, val_images=args.val_images, points_per_side=args.points_per_side or 16,
                ablations=args.ablations, ablation_steps=args.ablation_steps, seed=args.seed,
                workdir=join(args.out, "train"), storage=storage)
            suite, results = quality, quality.run_quality(config)
        elif args.suite == "scale":
            config = scale.ScaleConfig(args.shards, args.images_per_shard, args.small_shards)
            suite, results = scale, scale.run_scale(config)
        else:
            preset = read_bytes(args.config, storage).decode() if args.config else None
            config = speed.speed_config(
                args.sam_type, args.device, preset, images=args.images, num_images=args.num_images,
                timed_images=args.timed_images, prompts=args.prompts, points_per_side=args.points_per_side,
                batch_images=args.batch_images, tasks_per_image=args.tasks_per_image, min_run_time=args.min_run_time,
                job=not args.skip_job, precision=args.precision, storage=storage)
            suite, results = speed, speed.run_speed(config)
        files = suite.write_results(results, args.out, storage)
        print(suite.markdown(results))
        print("wrote " + ", ".join(files))
        return 0

    return run_main("benchmark", job, storage)


if __name__ == "__main__":
    sys.exit(main())
