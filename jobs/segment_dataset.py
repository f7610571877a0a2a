"""Label an image bucket: K task prompts -> COCO instance/semantic predictions as Parquet shards.

    ray job submit --working-dir . -- python jobs/segment_dataset.py --prompt "segment vehicles" \\
        --images s3://bucket/images/ --output s3://bucket/labels/ \\
        --sam-type vit_h --sam-checkpoint s3://bucket/sam_vit_h.pth --hypernet s3://bucket/hypernet.safetensors

With only --prompt it runs on the embedded default: the demo bucket (generated into data/demo if
missing) and the demo models. Rerunning the same command finishes what is missing and never
duplicates rows. Writes OUTPUT/<run_key>/_summary.json; exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import json
import sys

from talora.backbones.variants import DEFAULT_VARIANT, SAM_TYPES
from talora.batch.cluster import init_ray
from talora.batch.parts import DEFAULT_PART_FORMAT, PART_FORMATS
from talora.cli.common import add_layout_flags, add_storage_flags, layout_from_args, run_main, storage_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", action="append", default=[], help="a task prompt; repeat for K prompts in one pass")
    p.add_argument("--prompt-thresh", action="append", default=[], metavar="PROMPT=T",
                   help='a prompt\'s own presence threshold, e.g. "segment cars=0.7" (repeatable)')
    p.add_argument("--prompts-file", default=None,
                   help="a YAML list of prompts, each a string or {prompt: ..., presence_thresh: ...}")
    p.add_argument("--images", default=None, help="image prefix: sub-folders are shards (default: the demo bucket)")
    p.add_argument("--output", default="runs/labels", help="prediction prefix (local path or URI)")
    p.add_argument("--annotations", default=None, help="optional COCO JSON: use its image ids")
    p.add_argument("--sam-type", choices=SAM_TYPES, default=DEFAULT_VARIANT)
    p.add_argument("--sam-checkpoint", default=None, help="the base SAM (default: the one the hypernet file names)")
    p.add_argument("--hypernet", default=None,
                   help=f"trained hypernet file (local path or URI); default for {DEFAULT_VARIANT}: the shipped demo hypernet")
    p.add_argument("--adapter", default=None, help="a static adapter file instead of a hypernet")
    p.add_argument("--untrained", action="store_true",
                   help="no trained weights: a random base and the untrained hypernet (Delta W = 0), for smoke runs")
    p.add_argument("--mode", choices=("instance", "semantic", "both"), default="both")
    p.add_argument("--points-per-side", type=int, default=16)
    p.add_argument("--points-per-batch", type=int, default=64, help="decoder rows per call")
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.add_argument("--stability-thresh", type=float, default=0.8)
    p.add_argument("--nms-thresh", type=float, default=0.7, help="box NMS between a prompt's instances")
    p.add_argument("--mask-nms-thresh", type=float, default=0.5, help="then mask-IoU NMS (1 = off)")
    p.add_argument("--no-region-parts", dest="region_parts", action="store_false",
                   help="no instance for a part of the semantic mask that no point instance matches")
    p.add_argument("--presence-thresh", type=float, default=0.5)
    p.add_argument("--no-coarse-to-fine", dest="coarse_to_fine", action="store_false",
                   help="decode every grid point, not the coarse grid first and then the points no kept mask "
                   "covers (grids of 16 per side and more; coarser ones always decode every point)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast of the model passes (bf16 runs as fp16 on a GPU without bf16)")
    p.add_argument("--task", default=None, help="task id to write in the task column")
    p.add_argument("--boxes", default=None, help="a detector's boxes (COCO results JSON, or Parquet with image_uri|"
                   "image_id, bbox[, prompt]): each box is decoded as one instance under its prompt's adapter")
    p.add_argument("--part-format", choices=tuple(PART_FORMATS), default=DEFAULT_PART_FORMAT,
                   help="how the rows' part files are stored (part of the run key)")
    p.add_argument("--adapter-cache", default=None, help="where generated adapters are kept by (hypernet, prompt), "
                   "for later jobs to load (default: OUTPUT/_adapters)")
    p.add_argument("--no-adapter-cache", dest="adapter_cache", action="store_const", const="",
                   help="generate every adapter, keep none")
    add_layout_flags(p)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--shard-size", type=int, default=1000, help="virtual shard size for a flat folder")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--max-shards", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=100_000_000, help="larger images become error rows")
    p.add_argument("--ray-address", default=None)
    add_storage_flags(p)
    return p


def config_from_args(args: argparse.Namespace):
    from talora.label.job import LabelConfig, parse_prompt_thresholds, read_prompts_file
    from talora.model.loading import model_spec
    from talora.predict.predictor import PredictConfig

    prompts, thresholds = list(args.prompt), ()
    if args.prompts_file:
        listed, thresholds = read_prompts_file(args.prompts_file, storage_from_args(args))
        prompts += listed
    if not prompts:
        raise ValueError("give at least one --prompt (or --prompts-file)")
    thresholds += parse_prompt_thresholds(args.prompt_thresh, prompts)

    predict = PredictConfig(mode=args.mode, points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
                            score_thresh=args.score_thresh, stability_thresh=args.stability_thresh,
                            nms_thresh=args.nms_thresh, presence_thresh=args.presence_thresh,
                            mask_nms_thresh=args.mask_nms_thresh, region_parts=args.region_parts,
                            precision=args.precision, coarse_to_fine=args.coarse_to_fine,
                            prompt_thresholds=thresholds)
    model = model_spec(args.sam_type, args.sam_checkpoint, args.hypernet, args.adapter, args.untrained)
    return LabelConfig(prompts=tuple(prompts), images=args.images, output=args.output, model=model,
                       predict=predict, task=args.task, annotations=args.annotations, shard_size=args.shard_size,
                       max_images=args.max_images, max_shards=args.max_shards, max_pixels=args.max_pixels,
                       batch_size=args.batch_size, adapter_cache=args.adapter_cache, boxes=args.boxes,
                       part_format=args.part_format, layout=layout_from_args(args),
                       storage=storage_from_args(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    storage = storage_from_args(args)

    def job() -> int:
        from talora.label.job import demo_bucket, run_label_job

        if args.images is None:  # the embedded default: the demo bucket
            args.images, demo_annotations = demo_bucket()
            args.annotations = args.annotations or demo_annotations
        config = config_from_args(args)  # bad flags fail here, before Ray starts
        init_ray(args.ray_address)
        summary = run_label_job(config)
        print(json.dumps({k: summary[k] for k in ("output", "images", "rows", "errors", "seconds", "images_per_second")}))
        return 0

    return run_main("segment_dataset", job, storage)


if __name__ == "__main__":
    sys.exit(main())
