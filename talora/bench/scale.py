"""The scale suite (`jobs/benchmark.py --suite scale`): what the labelling job's driver spends per
shard, and that the number of images in a bucket costs it nothing.

Two local buckets of empty files are generated in a temporary folder: a large one (`shards` x
`images_per_shard`, default 1000 x 1000 = 10^6 files) and a small one (`small_shards` x
`images_per_shard`, default 10 x 1000 = 10^4). Zero-byte files are error rows, so the model costs
almost nothing and what is left is the driver's and the pipeline's own work.

- planning: `plan_shards` on each bucket (the driver's one listing of the prefix), median seconds,
  and seconds per shard;
- listing: `list_images` of one shard folder (what a listing task does per shard), median seconds
  and seconds per image;
- driver: the labelling job on each bucket with --max-shards 2 (the same 2 000 images labelled),
  each driver a separate process connected to one local Ray: its peak RSS and CPU seconds (from
  wait4), planning + time to the first committed shard, and wall seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from talora.batch.rows import read_summary
from talora.batch.shards import list_images, plan_shards
from talora.bench.report import machine, write_files
from talora.bench.timing import median_seconds
from talora.batch.cluster import init_ray
from talora.io.storage import StorageOptions
from talora.markdown import table

JOBS = Path(__file__).resolve().parents[2] / "jobs"  # the job scripts of a source checkout


@dataclass(frozen=True)
class ScaleConfig:
    shards: int = 1000
    images_per_shard: int = 1000
    small_shards: int = 10
    max_shards: int = 2  # shards each driver run labels
    min_run_time: float = 2.0  # seconds of timed planning and listing each (median of the runs)
    workdir: str | None = None  # where the buckets go (default: a temporary folder, removed after)


def write_bucket(root: str, shards: int, images_per_shard: int) -> str:
    """`shards` folders of `images_per_shard` empty .jpg files under `root` (made if missing); returns root."""
    for s in range(shards):
        folder = os.path.join(root, f"shard-{s:05d}")
        os.makedirs(folder, exist_ok=True)
        for i in range(images_per_shard):
            os.close(os.open(os.path.join(folder, f"{i:06d}.jpg"), os.O_CREAT | os.O_WRONLY, 0o644))
    return root


def run_driver(argv: list[str], ray_address: str, log: str) -> dict:
    """Runs `jobs/segment_dataset.py ARGV` as its own process on the Ray at `ray_address`; returns
    its exit code, its run's _summary.json, peak RSS (MB), CPU seconds and wall seconds. The
    process's output goes to `log`."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ADDRESS"] = ray_address
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(JOBS / "segment_dataset.py"), *argv], stdout=out,
                                   stderr=subprocess.STDOUT, env=env, cwd=JOBS.parent)
        _, code, usage = os.wait4(process.pid, 0)  # this process's own peak RSS and CPU, not its siblings'
    process.returncode = os.waitstatus_to_exitcode(code)
    wall = time.perf_counter() - started
    lines = Path(log).read_text().splitlines()
    printed = json.loads([line for line in lines if line.startswith("{")][-1]) if process.returncode == 0 else None
    summary = read_summary(printed["output"]) if printed else None
    return {"returncode": process.returncode, "summary": summary, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": wall, "log": log}


def label_argv(images: str, output: str, max_shards: int) -> list[str]:
    """The labelling job on a bucket of empty files: the untrained default variant (every image is an error row)."""
    return ["--prompt", "segment vehicles", "--images", images, "--output", output, "--untrained",
            "--points-per-side", "4", "--batch-size", "8", "--max-shards", str(max_shards)]


def run_scale(config: ScaleConfig) -> dict:
    with tempfile.TemporaryDirectory(dir=config.workdir) as tmp:
        buckets = {"large": (config.shards, write_bucket(os.path.join(tmp, "large"), config.shards,
                                                          config.images_per_shard)),
                   "small": (config.small_shards, write_bucket(os.path.join(tmp, "small"), config.small_shards,
                                                                config.images_per_shard))}
        results: dict = {"planning": {}, "listing": {}, "driver": {}}
        for name, (shards, root) in buckets.items():
            seconds = median_seconds(lambda: plan_shards(root), config.min_run_time)[0]
            results["planning"][name] = {"shards": shards, "images": shards * config.images_per_shard,
                                         "seconds": seconds, "s_per_shard": seconds / shards}
        folder = os.path.join(buckets["large"][1], "shard-00000")
        seconds = median_seconds(lambda: list_images(folder), config.min_run_time)[0]
        results["listing"] = {"images": config.images_per_shard, "s_per_shard": seconds,
                              "s_per_image": seconds / config.images_per_shard}
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the drivers below join this process's own local head
        init_ray()
        address = ray.get_runtime_context().gcs_address
        for name, (shards, root) in buckets.items():
            run = run_driver(label_argv(root, os.path.join(tmp, f"labels-{name}"), config.max_shards), address,
                             os.path.join(tmp, f"driver-{name}.log"))
            if run["returncode"] != 0:
                raise RuntimeError(f"the {name} bucket's driver failed:\n{Path(run['log']).read_text()[-3000:]}")
            s = run["summary"]
            results["driver"][name] = {
                "images_in_bucket": shards * config.images_per_shard, "images_labelled": s["images"],
                "peak_rss_mb": run["peak_rss_mb"], "cpu_s": run["cpu_s"], "planning_s": s["planning"]["seconds"],
                "first_commit_s": s["planning"]["seconds"] + s["first_commit_seconds"], "wall_s": run["wall_s"]}
    large, small = results["driver"]["large"], results["driver"]["small"]
    ratios = {k: large[k] / small[k] for k in ("peak_rss_mb", "cpu_s", "first_commit_s")}
    results["driver"]["large_vs_small"] = ratios
    # The target, shown and never asserted: the worst ratio within 10% of 1 (lower is better).
    worst = max(ratios.values())
    results["targets"] = {"driver_large_vs_small": {"value": worst, "target": 1.1, "met": worst <= 1.1}}
    return {"scale": results, "config": config.__dict__, "machine": machine(torch.device("cpu"))}


def markdown(results: dict) -> str:
    r = results["scale"]
    rows = [[f"planning ({p['shards']} shards, {p['images']} images)", f"{p['seconds'] * 1e3:.1f} ms",
             f"{p['s_per_shard'] * 1e6:.1f} us/shard"] for p in r["planning"].values()]
    rows.append([f"listing one shard ({r['listing']['images']} images, in a task)",
                 f"{r['listing']['s_per_shard'] * 1e3:.1f} ms", f"{r['listing']['s_per_image'] * 1e6:.1f} us/image"])
    for name in ("large", "small"):
        d = r["driver"][name]
        rows.append([f"driver, {d['images_in_bucket']} images in the bucket, {d['images_labelled']} labelled",
                     f"{d['peak_rss_mb']:.0f} MB peak, {d['cpu_s']:.1f} s CPU",
                     f"first commit {d['first_commit_s']:.1f} s, wall {d['wall_s']:.1f} s"])
    ratio = r["driver"]["large_vs_small"]
    target = r["targets"]["driver_large_vs_small"]
    rows.append(["driver, large / small", f"memory {ratio['peak_rss_mb']:.3f}x, CPU {ratio['cpu_s']:.3f}x",
                 f"first commit {ratio['first_commit_s']:.3f}x (target <= {target['target']}: "
                 f"{'met' if target['met'] else 'missed'})"])
    m = results["machine"]
    head = [f"# Scale suite: the driver plans by shard ({m['name']}, {m['cores']} cores, Ray {m['ray']})", ""]
    return "\n".join(head + table(["what", "measured", "per unit"], rows)) + "\n"


def write_results(results: dict, out: str, storage: StorageOptions | None = None) -> list[str]:
    """results.json and results.md under `out`; returns the files."""
    return write_files({"results.json": json.dumps(results, indent=1).encode(), "results.md": markdown(results).encode()},
                       out, storage)
