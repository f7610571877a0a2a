"""Score a labelling run against COCO ground truth: mask AP per task (COCOeval) and task mIoU.

    python jobs/evaluate.py --predictions runs/labels/<run_key> --annotations data/demo/val/instances.json \\
        --output runs/eval [--task-map "find cars=category:car"] [--backend faster-coco-eval]

Writes OUTPUT/report.json, report.md and per_task_ap.png; exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import json
import sys

from talora.cli.common import add_storage_flags, run_main, storage_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--predictions", required=True, help="a labelling run: OUTPUT/<run_key> (see its _summary.json)")
    p.add_argument("--annotations", required=True, help="COCO instances JSON with the ground truth")
    p.add_argument("--image-root", default=None)
    p.add_argument("--output", required=True)
    p.add_argument("--task-map", action="append", default=[], metavar="PROMPT=TASK",
                   help="map a prompt to a task id explicitly (repeatable)")
    p.add_argument("--backend", choices=("pycocotools", "faster-coco-eval"), default="pycocotools")
    add_storage_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    storage = storage_from_args(args)

    def job() -> int:
        from talora.eval.evaluate import EvalConfig, evaluate, parse_task_map

        task_map = parse_task_map(args.task_map)
        report = evaluate(EvalConfig(args.predictions, args.annotations, args.output, args.image_root, task_map,
                                     args.backend, storage))
        print(json.dumps({"images": report["images_evaluated"], "AP": report["overall"]["AP"],
                          "task_miou": report["task_miou"], "unmapped_prompts": report["unmapped_prompts"],
                          "report": f"{args.output.rstrip('/')}/report.md"}))
        return 0

    return run_main("evaluate", job, storage)


if __name__ == "__main__":
    sys.exit(main())
