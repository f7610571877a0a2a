"""A bucket as shards: the driver plans by shard, Ray tasks list the images.

A prefix's sub-folders are its shards (every image anywhere below a sub-folder belongs to it);
images directly under the prefix are cut into virtual shards of `shard_size` sorted keys.

Where the listing happens, and why:

- The driver lists the prefix itself, one level deep (on S3 one delimiter LIST per 1000 entries):
  the shard folders' names, nothing below them. It keeps one small `ShardPlan` per shard.
- Each folder shard's images are listed by a Ray task (`shard_items`, one recursive listing of that
  folder) that feeds the read stage, so the driver's memory and its time to the first committed
  shard grow with the number of shards, never with the number of images.
- `--max-images N` is the one case where the driver lists images: folder by folder, in order,
  until N are found (at most N images plus one folder's listing).
- Images directly under the prefix come back in the prefix's own listing, so the driver holds
  their names (a virtual shard carries its URIs). Buckets of more than a few million images
  belong in sub-folders (docs/scale.md).

Every item leaves the listing stamped with its shard's image count: the driver commits a shard
once that many items have come back, without ever having seen the shard's list.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from typing import Any

from talora.io.storage import StorageOptions, filesystem, with_retries

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ShardPlan:
    """One shard as the driver knows it."""

    name: str  # the sub-folder's name, or "virtual-00000" for a cut of the images directly under the prefix
    folder: str  # the sub-folder's URI ("" for a virtual shard)
    uris: tuple[str, ...] = ()  # its images when already listed (virtual shards, --max-images); () = a task lists them


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0] + "://" if "://" in uri and not uri.startswith("file://") else ""


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))  # hidden files, in-progress writes, _manifests and the like


def _is_image(path: str, extensions: tuple[str, ...]) -> bool:
    return path.lower().endswith(tuple(e.lower() for e in extensions))


def list_images(folder: str, options: StorageOptions | None = None,
                extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> tuple[str, ...]:
    """Every image anywhere below `folder`, sorted, as URIs with `folder`'s scheme (hidden and
    ``_``-prefixed names skipped, `extensions` case-insensitive)."""
    fs, root = filesystem(folder, options)
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # what is there now, not what this process saw before
    scheme = _scheme(folder)
    found = []
    for path in with_retries(lambda: fs.find(root), folder, options):
        relative = path[len(root):].lstrip("/")
        if _is_image(path, extensions) and not any(_hidden(part) for part in relative.split("/")):
            found.append(scheme + path)
    return tuple(sorted(found))


def plan_shards(prefix: str, shard_size: int = 1000, options: StorageOptions | None = None,
                max_shards: int | None = None, max_images: int | None = None,
                extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[ShardPlan]:
    """The shards of `prefix` in a stable order: virtual shards of the images directly under it
    first, then one per sub-folder, by name. Only the prefix is listed (one level), except with
    `max_images`, which lists folders in order until that many images are found and cuts the last.
    Raises FileNotFoundError naming a missing prefix."""
    fs, root = filesystem(prefix, options)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    if not with_retries(lambda: fs.exists(root), prefix, options):
        raise FileNotFoundError(f"no such image prefix: {prefix}")
    scheme = _scheme(prefix)
    flat, folders = [], []
    for entry in with_retries(lambda: fs.ls(root, detail=True), prefix, options):
        name = posixpath.basename(entry["name"].rstrip("/"))
        if _hidden(name):
            continue
        if entry["type"] == "directory":
            folders.append((name, scheme + entry["name"].rstrip("/")))
        elif _is_image(name, extensions):
            flat.append(scheme + entry["name"])
    flat.sort()
    plans = [ShardPlan(f"virtual-{i // shard_size:05d}", "", tuple(flat[i:i + shard_size]))
             for i in range(0, len(flat), shard_size)]
    plans += [ShardPlan(name, uri) for name, uri in sorted(folders)]
    if max_shards is not None:
        plans = plans[:max_shards]
    if max_images is None:
        return plans
    listed, count = [], 0
    for plan in plans:  # stop listing as soon as there are enough
        uris = (plan.uris or list_images(plan.folder, options, extensions))[:max_images - count]
        if uris:
            listed.append(ShardPlan(plan.name, plan.folder, tuple(uris)))
            count += len(uris)
        if count >= max_images:
            break
    return listed


def image_id_for_uri(uri: str) -> int:
    """A deterministic 63-bit id for an image without a COCO id (the `image_id` of its prediction rows)."""
    return int.from_bytes(hashlib.sha256(uri.encode()).digest()[:8], "big") >> 1


def shard_items(plan: dict, storage: StorageOptions | None = None, image_ids: dict[str, int] | None = None,
                extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[dict[str, Any]]:
    """Ray Data flat_map: one shard plan ({"shard", "folder", "uris"}) -> its items, each with its
    position in the shard and the shard's image count (`image_ids`: COCO ids by URI, where known)."""
    uris = list(plan["uris"]) or list_images(plan["folder"], storage, extensions)
    image_ids = image_ids or {}
    return [{"uri": uri, "image_id": image_ids[uri] if uri in image_ids else image_id_for_uri(uri), "shard": plan["shard"],
             "index": index, "shard_items": len(uris)} for index, uri in enumerate(uris)]
