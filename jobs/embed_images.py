"""Write the embedding cache: frozen SAM trunk features for every image, as Parquet shards.

    ray job submit --working-dir . -- python jobs/embed_images.py \\
        --annotations s3://bucket/coco/train/instances.json --sam-type vit_h \\
        --sam-checkpoint s3://bucket/models/sam_vit_h.pth --output s3://bucket/cache/

Without a cluster it starts a local Ray. Rerunning the same command skips committed shards.
Prints progress and writes OUTPUT/<run_key>/_summary.json; exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import json
import sys

from talora.backbones.variants import DEFAULT_VARIANT, SAM_TYPES
from talora.train.embed import EmbedConfig, run_embed_job
from talora.batch.cluster import init_ray
from talora.cli.common import add_layout_flags, add_storage_flags, layout_from_args, run_main, storage_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="cache prefix (local path or URI)")
    p.add_argument("--images", default=None, help="image prefix; sub-folders are shards")
    p.add_argument("--annotations", default=None, help="COCO instances JSON; images from --image-root or beside it")
    p.add_argument("--image-root", default=None)
    p.add_argument("--sam-type", choices=SAM_TYPES, default=DEFAULT_VARIANT)
    p.add_argument("--sam-checkpoint", default=None, help="local path or any fsspec URI")
    p.add_argument("--tail-blocks", type=int, default=None, help="k adapted blocks (default per variant; 0 = decoder-only)")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    add_layout_flags(p)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS, else a local Ray")
    add_storage_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    storage = storage_from_args(args)

    def job() -> int:
        config = EmbedConfig(
            output=args.output, images=args.images, annotations=args.annotations, image_root=args.image_root,
            sam_type=args.sam_type, sam_checkpoint=args.sam_checkpoint, tail_blocks=args.tail_blocks,
            shard_size=args.shard_size, batch_size=args.batch_size, layout=layout_from_args(args), max_images=args.max_images,
            storage=storage,
        )
        init_ray(args.ray_address)
        summary = run_embed_job(config)
        print(json.dumps({k: summary[k] for k in ("output", "images", "errors", "seconds", "images_per_second")}))
        return 0

    return run_main("embed_images", job, storage)


if __name__ == "__main__":
    sys.exit(main())
