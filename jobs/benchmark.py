"""Speed numbers of the hot paths, measured side by side in one run; printed and saved as JSON.

    python jobs/benchmark.py [--device cpu|cuda] [--sam-type vit_tiny|vit_h] [--config PRESET] --out FILE

label latency (2 prompts), one hypernet training step (fp32; fp16 and bf16 AMP on CUDA) and one
pretraining step (CPU presets): see talora.bench.speed. Numbers belong to the machine they were
taken on: the JSON records it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from talora.variants import SAM_TYPES
from talora.bench.speed import print_report, run_speed, speed_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sam-type", default="vit_tiny", choices=SAM_TYPES)
    p.add_argument("--config", help="a training preset: its model (random weights) and batch for the train step")
    p.add_argument("--batch-images", type=int, default=None, help="train step: images (default 8, or the preset's)")
    p.add_argument("--tasks-per-image", type=int, default=None, help="train step: tasks per image (default 2, or the "
                   "preset's); rows = images x tasks")
    p.add_argument("--skip-label", action="store_true", help="train steps only")
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timed runs per path (after warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="runs/benchmark.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    preset = None
    if args.config:
        with open(args.config) as f:
            preset = f.read()
    try:  # a bad preset fails before any work
        config = speed_config(args.sam_type, args.device, preset, args.batch_images, args.tasks_per_image,
                              args.min_run_time, not args.skip_label)
    except ValueError as e:
        print(f"benchmark: error: --config {args.config}: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_speed(config)
    print_report(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
