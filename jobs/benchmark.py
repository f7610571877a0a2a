"""Benchmarks: the speed suite (the labelling and training hot paths, side by side in one run).

    python jobs/benchmark.py --suite speed [--images URI] [--num-images N] [--prompts K] \\
        [--device cpu|cuda] [--sam-type vit_tiny|vit_h] [--config PRESET] --out DIR

With no data flags it runs on generated demo images with the shipped models (random weights of the
real architecture for other variants). Writes DIR/results.json, DIR/results.md and DIR/prompts.png,
with the machine recorded; prints the Markdown. See talora.bench.speed for what is measured.
"""

from __future__ import annotations

import argparse
import sys

import torch

from talora.bench.speed import markdown, run_speed, speed_config, write_results
from talora.jobs_common import add_storage_flags, run_main, storage_from_args
from talora.variants import SAM_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=("speed",), default="speed")
    p.add_argument("--images", default=None, help="image prefix (default: demo images, generated)")
    p.add_argument("--num-images", type=int, default=None, help="images generated or listed (default 1000)")
    p.add_argument("--timed-images", type=int, default=None, help="images the model paths cycle through (default 16)")
    p.add_argument("--prompts", type=int, default=None, help="K prompts of the floor and naive paths (default 2)")
    p.add_argument("--points-per-side", type=int, default=None, help="instance grid (default 16, as the job's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sam-type", default="vit_tiny", choices=SAM_TYPES)
    p.add_argument("--config", help="a training preset: its model (random weights) and batch for the train step")
    p.add_argument("--batch-images", type=int, default=None, help="train step: images (default 8, or the preset's)")
    p.add_argument("--tasks-per-image", type=int, default=None, help="train step: tasks per image (default 2)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds of timed runs per path (default 2)")
    p.add_argument("--skip-job", action="store_true", help="no labelling job end to end (no Ray)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="runs/bench", help="output folder (path or URI)")
    add_storage_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    storage = storage_from_args(args)

    def job() -> int:
        preset = open(args.config).read() if args.config else None
        config = speed_config(args.sam_type, args.device, preset, images=args.images, num_images=args.num_images,
                              timed_images=args.timed_images, prompts=args.prompts,
                              points_per_side=args.points_per_side, batch_images=args.batch_images,
                              tasks_per_image=args.tasks_per_image, min_run_time=args.min_run_time,
                              job=not args.skip_job, storage=storage)
        if args.threads:
            torch.set_num_threads(args.threads)
        results = run_speed(config)
        files = write_results(results, args.out, storage)
        print(markdown(results))
        print("wrote " + ", ".join(files))
        return 0

    return run_main("benchmark", job, storage)


if __name__ == "__main__":
    sys.exit(main())
