"""Validation numbers of a base SAM and a hypernet trained on it (the demo-models table in docs/results.md).

    python jobs/report_demo_models.py --hypernet runs/demo-models/hypernet.safetensors \\
        --train-annotations data/demo-models/train/instances.json \\
        --val-annotations data/demo-models/val/instances.json \\
        --static-run runs/demo-models/static-category_car ... --out runs/demo-models/report

The base (point/box mIoU, linear probes), the hypernet's task mIoU per group beside its no-adapter
floor and the references, and static LoRAs beside it (talora.bench.demo_models). Writes
report.json and report.md under --out; prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import sys

from talora.bench.demo_models import DemoReportConfig, demo_models_report, markdown
from talora.cli.common import add_storage_flags, run_main, storage_from_args
from talora.io.storage import join, write_bytes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hypernet", required=True, help="hypernet file (path or URI)")
    p.add_argument("--sam-checkpoint", default=None, help="the base (default: the one the hypernet file names)")
    p.add_argument("--train-annotations", required=True, help="COCO JSON the probe is fitted on")
    p.add_argument("--val-annotations", required=True, help="COCO JSON everything is scored on")
    p.add_argument("--val-images", type=int, default=40, help="validation images scored")
    p.add_argument("--probe-train-images", type=int, default=2048, help="training images the linear probe is fitted on")
    p.add_argument("--probe-test-images", type=int, default=100, help="validation images the linear probe is scored on")
    p.add_argument("--static-run", action="append", default=[], help="a static-mode run folder (repeatable)")
    p.add_argument("--out", required=True, help="output folder (path or URI): report.json, report.md")
    add_storage_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    storage = storage_from_args(args)

    def job() -> int:
        config = DemoReportConfig(args.hypernet, args.train_annotations, args.val_annotations, args.sam_checkpoint,
                                  args.val_images, args.probe_train_images, args.probe_test_images,
                                  tuple(args.static_run), storage)
        report = demo_models_report(config)
        text = markdown(report)
        write_bytes(join(args.out, "report.json"), json.dumps(report, indent=1).encode(), storage)
        write_bytes(join(args.out, "report.md"), text.encode(), storage)
        print(text)
        return 0

    return run_main("report_demo_models", job, storage)


if __name__ == "__main__":
    sys.exit(main())
