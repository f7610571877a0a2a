"""The ``talora`` command.

    talora info --sam-type vit_b [--json]                      LoRA targets and parameter counts
    talora adapter --prompt "segment vehicles" --out a.safetensors [--hypernet PATH]
    talora predict --image URI --prompt ... --out overlay.png  one image, K prompts
    talora tasks --annotations URI [--json]                    tasks, prompts and splits of a dataset
    talora demo-data --out URI --num-images N --seed S         the synthetic demo domain
    talora probe --annotations URI [--sam-checkpoint URI]      does the base encode what tasks name?
    talora checkpoint RUN [--best] [--file NAME]               a finished training run's checkpoint
    talora status OUTPUT [--json]                              where a labelling job is (its status file)
    talora export --predictions RUN --format coco|yolo --out DIR   labels out as a dataset that trains as it is
    talora merge | export-peft | plot-run | viz | fp16         adapters out; curves; overlays; fp16 files
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from talora.backbones.variants import DEFAULT_VARIANT, SAM_TYPES
from talora.cli.common import add_storage_flags, run_main, storage_from_args
from talora.config import ModelConfig, SamConfig, default_config, dump_config, load_config
from talora.core.text import TextEncoder, validate_prompts
from talora.data.coco import CocoDataset
from talora.data.synthetic import SyntheticConfig, write_demo_dataset
from talora.data.tasks import TaskSet
from talora.eval.probe import probe_base
from talora.eval.viz import overlay_png, plot_run, render_predictions
from talora.io.images import decode_image
from talora.io.storage import StorageOptions, join, read_bytes, write_bytes
from talora.io.weights import read_weights, write_weights
from talora.label.export.config import IMAGE_FILES
from talora.label.export.readback import READERS, check_readable, read_back
from talora.label.export.run import WRITERS, ExportConfig, export_run
from talora.model.files import AdapterCache, adapter_header, save_adapter
from talora.model.loading import (HYPERNET_FORMAT, build_task_aware_sam, load_backbone, load_model, load_task_aware_sam,
                                  model_spec)
from talora.model.peft import export_peft, merge_into_checkpoint
from talora.predict.predictor import PredictConfig, TaskAwarePredictor
from talora.train.checkpoint import run_checkpoint


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sam-type", choices=SAM_TYPES, default=None, help=f"SAM variant (default {DEFAULT_VARIANT})")
    p.add_argument("--sam-checkpoint", default=None, help="base SAM weights: local path or any fsspec URI")
    p.add_argument("--config", default=None, help="model config YAML (strict); flags override it")
    _add_storage_args(p)


_add_storage_args = add_storage_flags  # the same storage flags as the jobs


def _model_config(args: argparse.Namespace) -> ModelConfig:
    if args.config:
        with open(args.config) as f:
            config = load_config(f)
        if args.sam_type:
            config = dataclasses.replace(config, sam=dataclasses.replace(config.sam, sam_type=args.sam_type))
    else:
        config = default_config(args.sam_type or DEFAULT_VARIANT)
    if args.sam_checkpoint:
        config = dataclasses.replace(config, sam=dataclasses.replace(config.sam, checkpoint=args.sam_checkpoint))
    return config


def _storage(args: argparse.Namespace) -> StorageOptions:
    return storage_from_args(args)


def cmd_info(args: argparse.Namespace) -> int:
    config = _model_config(args)
    model = build_task_aware_sam(config, storage=_storage(args))
    counts = model.parameter_counts()
    info = {
        "sam_type": config.sam.sam_type,
        "tail_blocks": config.tail_blocks,
        "rank": config.lora.rank,
        "alpha": config.lora.alpha,
        "num_targets": len(model.targets),
        "targets": [
            {"name": t.name, "in_features": t.in_features, "out_features": t.out_features, "component": t.component}
            for t in model.targets
        ],
        **counts,
        "trainable_percent": 100.0 * counts["trainable_params"] / counts["total_params"],
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"SAM {info['sam_type']}: LoRA rank {info['rank']}, alpha {info['alpha']}, "
          f"encoder tail = last {info['tail_blocks']} block(s)")
    print(f"{'target':<72} {'in':>5} {'out':>5}")
    for t in info["targets"]:
        print(f"{t['name']:<72} {t['in_features']:>5} {t['out_features']:>5}")
    print(f"{info['num_targets']} targets; adapter = {counts['adapter_params_per_prompt']:,} numbers per prompt")
    print(f"trainable {counts['trainable_params']:,} / total {counts['total_params']:,} params "
          f"({info['trainable_percent']:.2f}%; frozen SAM {counts['sam_params']:,}; text encoder not counted)")
    return 0


def cmd_adapter(args: argparse.Namespace) -> int:
    (prompt,) = validate_prompts([args.prompt])
    storage = _storage(args)
    config = _model_config(args)
    hypernet = model_spec(config.sam.sam_type, args.sam_checkpoint, args.hypernet, None, args.untrained).hypernet
    if hypernet:  # given, or the shipped demo hypernet on the default variant
        model = load_task_aware_sam(hypernet, args.sam_checkpoint, TextEncoder(), storage)
    else:
        torch.manual_seed(args.seed)
        model = build_task_aware_sam(config, TextEncoder(), storage)
        print("note: no trained hypernet: the untrained one (bias-HyperInit) emits Delta W = 0", file=sys.stderr)
    model.eval()
    with torch.no_grad():
        if args.cache:  # the labelling job's adapter cache: loaded when there, else generated into it
            found = AdapterCache(args.cache, storage).fill(model, [prompt])[prompt]
            print(f"adapter cache {args.cache}: {found}")
        adapter = model.adapters([prompt]).row(0)
    sam_type = model.config.sam.sam_type
    header = adapter_header(model, prompt)
    save_adapter(args.out, adapter, header, storage)

    delta_norms = {name: adapter.delta_weight(name).norm().item() for name in adapter.weights}
    numbers = sum(a.numel() + b.numel() for a, b in adapter.weights.values())
    print(f"adapter for {prompt!r} -> {args.out}")
    print(f"  SAM {sam_type}, {len(adapter.weights)} targets, rank {header.rank}, alpha {header.alpha:g}, "
          f"{numbers:,} numbers, hypernet {header.hypernet_digest}")
    print(f"  |Delta W|_F: max {max(delta_norms.values()):.4g}, mean {sum(delta_norms.values()) / len(delta_norms):.4g}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    dataset = CocoDataset.load(args.annotations, storage=_storage(args))
    tasks = TaskSet.from_dataset(dataset)
    rows = [{"id": t.id, "kind": t.kind, "heldout_composition": t.heldout, "train_prompts": t.train_prompts,
             "heldout_prompts": t.heldout_prompts,
             "instances": sum(t.matches(i) for i in dataset.all_instances())} for t in tasks]
    if args.json:
        print(json.dumps({"annotations": args.annotations, "warnings": dataset.warnings, "tasks": rows}, indent=2))
        return 0
    print(f"{len(rows)} tasks from {args.annotations} ({len(dataset.images)} images)")
    for r in rows:
        split = "held-out composition" if r["heldout_composition"] else "train"
        example = (r["train_prompts"] or r["heldout_prompts"])[0]
        print(f"  {r['id']:<34} {r['kind']:<13} {r['instances']:>6} instances  {split:<20} e.g. {example!r}")
    return 0  # dataset warnings went to stderr through logging


def cmd_demo_data(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    config = SyntheticConfig(image_size=args.image_size, image_format=args.format, palette=args.palette,
                             background=args.background, min_size=args.min_size, max_size=args.max_size)
    written = write_demo_dataset(args.out, args.num_images, args.num_val, args.seed, config, args.shard_size, _storage(args))
    seconds = time.perf_counter() - start
    total = args.num_images + args.num_val
    print(f"wrote {total} images in {seconds:.1f} s ({total / seconds:.0f} images/s)")
    for split, uri in written.items():
        print(f"  {split}: {uri}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    out = merge_into_checkpoint(args.adapter, args.sam_checkpoint, args.out, _storage(args))
    print(f"merged {args.adapter} into {args.sam_checkpoint or 'a randomly initialised base'} -> {out}")
    return 0


def cmd_export_peft(args: argparse.Namespace) -> int:
    for path in export_peft(args.adapter, args.out, _storage(args)):
        print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.read_back:
        check_readable(args.out)  # before the export's work
    counts = export_run(ExportConfig(args.predictions, args.out, args.format, args.kind, args.min_score,
                                     args.images_prefix, args.image_files, args.val_fraction, _storage(args)))
    print(json.dumps(counts))
    if args.read_back:
        for split, found in read_back(args.out, args.format).items():
            print(f"read back ({READERS[args.format]}), {split}: " + ", ".join(f"{v} {k}" for k, v in found.items()))
    return 0


def cmd_plot_run(args: argparse.Namespace) -> int:
    print(f"wrote {plot_run(args.run_dir, args.out, _storage(args))}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    prompts = validate_prompts(args.prompt)
    storage = _storage(args)
    image = decode_image(read_bytes(args.image, storage))
    model = load_model(model_spec(args.sam_type or DEFAULT_VARIANT, args.sam_checkpoint, args.hypernet, args.adapter,
                                  args.untrained), storage)
    if torch.cuda.is_available():  # as the labelling job's actors
        model = model.cuda()
    predictor = TaskAwarePredictor(model, PredictConfig(mode=args.mode, points_per_side=args.points_per_side,
                                                        presence_thresh=args.presence_thresh, precision=args.precision))
    boxes = [{"bbox": parse_box(b), "prompt": None} for b in args.box] if args.box else None
    results = predictor.predict(image, prompts, boxes)
    as_dicts = {p: [{**dataclasses.asdict(d), "segmentation": d.rle} for d in ds] for p, ds in results.items()}
    write_bytes(args.out, overlay_png(image, as_dicts), storage)
    for prompt, detections in results.items():
        kinds = [d.kind for d in detections]
        print(f"{prompt!r}: {kinds.count('semantic')} semantic mask, {kinds.count('instance')} instance(s)")
    if args.json:
        print(json.dumps({p: [{k: v for k, v in d.items() if k != "segmentation"} for d in ds]
                          for p, ds in as_dicts.items()}, indent=1))
    print(f"wrote {args.out}")
    return 0


def parse_box(text: str) -> list[float]:
    """--box "x,y,w,h" (pixels of the image) -> [x, y, w, h]."""
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or box[2] <= 0 or box[3] <= 0:
        raise ValueError(f"--box {text!r}: expected x,y,w,h in pixels with w and h > 0, e.g. 10,20,64,48")
    return box


def cmd_probe(args: argparse.Namespace) -> int:
    storage = _storage(args)
    config = _model_config(args)
    backbone = load_backbone(config.sam.sam_type, config.sam.checkpoint, storage)
    train = CocoDataset.load(args.annotations, storage=storage)
    test = CocoDataset.load(args.val_annotations or args.annotations, storage=storage)
    if not args.val_annotations:  # one dataset: fit on its first half of images, score on the second
        half = len(train.image_ids) // 2
        train.images = {i: train.images[i] for i in train.image_ids[:half]}
        test.images = {i: test.images[i] for i in test.image_ids[half:]}
    results = probe_base(backbone, train, test, config.tail_blocks, train_images=args.train_images,
                         test_images=args.test_images, storage=storage)
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=1))
        return 0
    print(f"linear probe on {config.sam.sam_type} trunk features (first {backbone.num_blocks - config.tail_blocks}"
          f" blocks), cells inside objects")
    for r in results:
        print(f"  {r.key:<14} accuracy {r.accuracy:.3f}  (chance {r.chance:.3f}, {r.classes} classes, "
              f"{r.train_cells} train / {r.test_cells} test cells)")
    return 0


def cmd_fp16(args: argparse.Namespace) -> int:
    """A weights file with its floating tensors in fp16 (half the size; the shipped demo models)."""
    storage = _storage(args)
    state, header = read_weights(args.input, storage)
    if args.sam_checkpoint:  # a hypernet's header names its base: point it at the shipped one
        if "config" not in header:
            raise ValueError(f"{args.input} has no model config in its header; --sam-checkpoint is for hypernet files")
        config = load_config(header["config"])
        header["config"] = dump_config(dataclasses.replace(
            config, sam=dataclasses.replace(config.sam, checkpoint=args.sam_checkpoint)))
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    if header.get("format") == HYPERNET_FORMAT:  # its digest names the weights as they will load
        config = load_config(header["config"])
        model = build_task_aware_sam(dataclasses.replace(config, sam=SamConfig(config.sam.sam_type)))  # no base needed
        model.load_hypernet_weights(half, args.input)
        header["digest"] = model.hypernet.digest()
    write_weights(args.out, half, header, storage)
    size = sum(v.numel() * v.element_size() for v in half.values())
    print(f"wrote {args.out}: {len(half)} tensors, {size / 2**20:.2f} MiB")
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    found = run_checkpoint(args.run_dir, "best" if args.best else "latest", _storage(args))
    print(join(found, args.file) if args.file else found)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from talora.batch.commit import read_status
    from talora.batch.pipeline import progress

    run, now = read_status(args.output, _storage(args))
    if args.json:
        print(json.dumps({"run": run, **now}, indent=1))
    else:
        print(f"{run}: {now['state']} at {now['updated']}: {progress(now)}, {now['images']['errors']} error(s)")
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    files = render_predictions(args.predictions, args.out, args.prompt, args.max_images, _storage(args), args.images)
    print(f"wrote {len(files)} overlay(s) to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="talora", description="Text-to-LoRA for Segment Anything")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="LoRA targets and parameter counts for a SAM variant")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("adapter", help="generate one prompt's adapter file")
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help='the task, e.g. "segment vehicles"')
    p.add_argument("--hypernet", default=None,
                   help=f"trained hypernet file (local path or URI); default for {DEFAULT_VARIANT}: the shipped demo hypernet")
    p.add_argument("--untrained", action="store_true", help="the untrained hypernet (Delta W = 0), for smoke runs")
    p.add_argument("--out", required=True, help="adapter .safetensors to write (local path or URI)")
    p.add_argument("--seed", type=int, default=0, help="init seed of the --untrained hypernet")
    p.add_argument("--cache", default=None, help="an adapter cache (the labelling job's OUTPUT/_adapters): "
                   "load the adapter from it, or generate it into it")
    p.set_defaults(func=cmd_adapter)

    p = sub.add_parser("tasks", help="tasks, prompts and splits derived from a COCO dataset")
    p.add_argument("--annotations", required=True, help="COCO instances JSON (local path or URI)")
    p.add_argument("--json", action="store_true")
    _add_storage_args(p)
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("demo-data", help="write the synthetic demo domain (COCO train + val)")
    p.add_argument("--out", required=True, help="output prefix (local path or URI)")
    p.add_argument("--num-images", type=int, default=200, help="training images")
    p.add_argument("--num-val", type=int, default=50, help="validation images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=None, help="write images into shard-XXXXX/ sub-folders of this size")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg")
    p.add_argument("--palette", choices=("demo", "other"), default="demo", help="colour values (other: none of the demo's)")
    p.add_argument("--background", choices=("textured", "checker"), default="textured")
    p.add_argument("--min-size", type=int, default=64, help="smallest object extent (px)")
    p.add_argument("--max-size", type=int, default=160, help="largest object extent (px)")
    _add_storage_args(p)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("export", help="a labelling run's labels as a COCO or YOLO-seg dataset that trains as it is")
    p.add_argument("--predictions", required=True, help="a labelling run: OUTPUT/<run_key>")
    p.add_argument("--format", choices=tuple(WRITERS), default="coco")
    p.add_argument("--out", required=True, help="the dataset folder (any URI): images/{train,val}/ and the labels")
    p.add_argument("--image-files", choices=IMAGE_FILES, default=ExportConfig.image_files,
                   help="copy the images into the dataset, or link them (local images and --out only)")
    p.add_argument("--val-fraction", type=float, default=ExportConfig.val_fraction,
                   help="of the images, this fraction goes to val (exactly: floor(n * fraction))")
    p.add_argument("--read-back", action="store_true",
                   help="then read the dataset with the format's own readers and print what they found (local)")
    p.add_argument("--kind", choices=("instance", "semantic"), default="instance", help="rows that become annotations")
    p.add_argument("--min-score", type=float, default=0.0, help="leave out masks scored below this")
    p.add_argument("--images-prefix", default=None, help="file names relative to this (default: the run's --images)")
    _add_storage_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("merge", help="merge an adapter file into a full SAM checkpoint")
    p.add_argument("--adapter", required=True, help="adapter .safetensors (talora adapter, or a static run's)")
    p.add_argument("--sam-checkpoint", default=None, help="the base SAM the adapter was made for")
    p.add_argument("--out", required=True, help="merged SAM checkpoint (.safetensors) to write")
    _add_storage_args(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export-peft", help="write an adapter file as a PEFT adapter folder")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True, help="folder for adapter_config.json + adapter_model.safetensors")
    _add_storage_args(p)
    p.set_defaults(func=cmd_export_peft)

    p = sub.add_parser("plot-run", help="draw a training run's loss and validation curves to PNG")
    p.add_argument("run_dir", help="the run folder (<storage-path>/<name>), local or URI")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    _add_storage_args(p)
    p.set_defaults(func=cmd_plot_run)

    p = sub.add_parser("predict", help="segment one image under one or more prompts and draw the overlay")
    p.add_argument("--image", required=True, help="image path or URI")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--sam-type", choices=SAM_TYPES, default=None)
    p.add_argument("--sam-checkpoint", default=None)
    p.add_argument("--hypernet", default=None, help=f"default for {DEFAULT_VARIANT}: the shipped demo hypernet")
    p.add_argument("--adapter", default=None)
    p.add_argument("--untrained", action="store_true", help="a random base and the untrained hypernet (smoke runs)")
    p.add_argument("--mode", choices=("instance", "semantic", "both"), default="both")
    p.add_argument("--points-per-side", type=int, default=16)
    p.add_argument("--presence-thresh", type=float, default=0.5)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast of the model passes")
    p.add_argument("--box", action="append", default=[], metavar="X,Y,W,H",
                   help="a box prompt in image pixels (repeatable): the instances are the boxes' masks, under every prompt")
    p.add_argument("--out", required=True, help="overlay PNG")
    p.add_argument("--json", action="store_true", help="also print the detections (without masks)")
    _add_storage_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("probe", help="linear probes on frozen trunk features: category, supercategory, colour")
    _add_model_args(p)
    p.add_argument("--annotations", required=True, help="COCO JSON to fit on (and to score on, split in half)")
    p.add_argument("--val-annotations", default=None, help="COCO JSON to score on")
    p.add_argument("--train-images", type=int, default=2048, help="images the probe is fitted on")
    p.add_argument("--test-images", type=int, default=100, help="images it is scored on")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("fp16", help="a weights file (SAM base, hypernet, adapter) with fp16 tensors")
    p.add_argument("input", help="safetensors file (path or URI)")
    p.add_argument("out", help="output file (path or URI)")
    p.add_argument("--sam-checkpoint", default=None, help="hypernet files: the base SAM its header names")
    _add_storage_args(p)
    p.set_defaults(func=cmd_fp16)

    p = sub.add_parser("checkpoint", help="print a finished training run's latest (or best) checkpoint folder")
    p.add_argument("run_dir", help="the run folder (<storage-path>/<name>), local or URI")
    p.add_argument("--best", action="store_true", help="the best checkpoint by val_score instead of the latest")
    p.add_argument("--file", default=None, help="a file inside it, e.g. hypernet.safetensors")
    _add_storage_args(p)
    p.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser("status", help="where a labelling (or embedding) job is: its status file, read while it runs")
    p.add_argument("output", help="the job's --output (holding one run) or a run folder OUTPUT/<run_key>")
    p.add_argument("--json", action="store_true", help="the whole status file")
    _add_storage_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("viz", help="overlays of a labelling run's predictions, one PNG per image")
    p.add_argument("--predictions", required=True, help="a labelling run: OUTPUT/<run_key>")
    p.add_argument("--images", default=None, help="the labelled image prefix (default: the rows' own URIs)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--prompt", action="append", default=None, help="only these prompts (repeatable)")
    p.add_argument("--max-images", type=int, default=20)
    _add_storage_args(p)
    p.set_defaults(func=cmd_viz)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    storage = _storage(args) if hasattr(args, "s3_endpoint_url") else StorageOptions()
    return run_main(f"talora {args.command}", lambda: args.func(args), storage)


if __name__ == "__main__":
    sys.exit(main())
