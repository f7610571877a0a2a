"""The GPU check (`make gpu-check`): every GPU path of talora in one command, within 8 minutes on
a lent device, and the same script on the CPU with tiny presets (`make gpu-check DRY=1`).

Sections, each a subprocess with its own time limit (one that fails or hangs costs its own
section only; the results say which ran, how long, and why one did not):

- tests: `pytest -m gpu tests/gpu` (the CUDA twins); the dry run collects them only;
- speed-<variant>: the speed suite (talora.bench.speed) on the device at each precision, one
  model for both: floor, K = 1/2/4/8 prompts, breakdown, `reference` (SamPredictor /
  SAM2ImagePredictor / Sam3Processor), `reference_fast` (segment-anything-fast, where it is installed), the
  train step; for the first variant at the first precision also the labelling job through Ray
  Data (one actor per GPU, batched trunk) over `job_images` generated images, then again with two
  actors on each GPU (`--gpus-per-actor 0.5`), its rate beside the first and its status file;
- train: Ray Train runs of a hypernet on `train_variant` through the real trainer
  (talora.train.trainer.run_training) in fp32, bf16 and fp16 AMP: the median step, steps/s and
  the worker's peak GPU memory; then the bf16 run relaunched with more steps, resuming from its
  checkpoint.

Then `targets` (each value beside its target, met or by how much missed), results.json (every
number under `gpu.`), results.md and a one-screen summary.

    python jobs/gpu_check.py run --out DIR [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from talora.backbones.variants import FAMILIES, cpu_preset, largest
from talora.bench import speed
from talora.bench.speed import PROMPTS
from talora.batch.cluster import init_ray
from talora.data.coco import CocoDataset
from talora.data.synthetic import CATEGORIES, PALETTES, write_demo_dataset
from talora.data.tasks import TaskSet
from talora.io.storage import read_bytes
from talora.markdown import table
from talora.model.loading import load_model, model_spec
from talora.train.config import load_run_spec
from talora.train.trainer import run_training

REPO = Path(__file__).resolve().parents[2]
TRAIN_PRECISIONS = ("fp32", "bf16", "fp16")
AMP = {"fp32": {"amp": False}, "bf16": {"amp": True, "amp_dtype": "bfloat16"},
       "fp16": {"amp": True, "amp_dtype": "float16"}}


@dataclass(frozen=True)
class Plan:
    """What the check runs: the GPU plan, or its CPU twin with the tiny presets."""

    device: str
    variants: tuple[str, ...]  # speed suite, in this order (the first also runs the labelling job)
    precisions: tuple[str, ...]  # speed suite autocast, the first with the job
    job_images: int
    timed_images: int
    min_run_time: float
    points_per_side: int
    train_variant: str
    train_preset: str  # a training preset of configs/: its model section; the check sets the train section
    train_steps: int
    resume_steps: int
    cpus_per_worker: float
    # seconds each section may take at most (a section also gets no more than what the deadline leaves)
    limits: dict[str, float] = field(default_factory=dict)  # by SECTIONS name
    deadline_s: float = 480.0


# The device's 8 minutes: each section's limit, and a deadline for them all (the install comes before).
# The GPU plan runs each family's largest variant, the dry run each family's CPU preset; the first
# family's also runs the labelling job and the training runs (its preset names the same variant).
# No limit has been measured on a GPU yet: they split the deadline by how much each section runs.
_LARGEST = tuple(largest(family) for family in FAMILIES)
_PRESETS = tuple(cpu_preset(family) for family in FAMILIES)
GPU = Plan("cuda", _LARGEST, ("bf16", "fp32"), job_images=200, timed_images=4, min_run_time=0.5,
           points_per_side=16, train_variant=_LARGEST[0], train_preset="configs/t4_vit_h.yaml", train_steps=30,
           resume_steps=10, cpus_per_worker=4.0,
           limits={"tests": 60, "speed-0": 150, "train": 130, "speed-1": 60, "speed-2": 60}, deadline_s=460.0)
DRY = Plan("cpu", _PRESETS, ("bf16", "fp32"), job_images=8, timed_images=2, min_run_time=0.01,
           points_per_side=4, train_variant=_PRESETS[0], train_preset="configs/demo_cpu.yaml", train_steps=3,
           resume_steps=2, cpus_per_worker=1.0,
           limits={"tests": 300, "speed-0": 600, "train": 600, "speed-1": 600, "speed-2": 600}, deadline_s=3600.0)
# (the dry run's limits only stop a hang: it must finish on a busy 2-core CI machine; its time is reported)
SECTIONS = ("tests", "speed-0", "train", "speed-1", "speed-2")  # speed-i: plan.variants[i]


def plan_of(dry_run: bool) -> Plan:
    return DRY if dry_run else GPU


def check_prompts() -> list[str]:
    """Every prompt the check can encode: the speed suite's, and every task prompt (train and
    held-out paraphrases) of the demo domain in both palettes, for every colour x category pair
    (a superset of what any generated demo dataset yields). The carry's text table holds these."""
    colours = sorted({c for palette in PALETTES.values() for c in palette})
    box = [0, 0, 4, 0, 4, 4, 0, 4]
    annotations = [{"id": i + 1, "image_id": 1, "category_id": category["id"], "segmentation": [box], "area": 16.0,
                    "bbox": [0, 0, 4, 4], "iscrowd": 0, "attributes": {"color": colour}}
                   for i, (category, colour) in enumerate((c, k) for c in CATEGORIES for k in colours)]
    data = {"images": [{"id": 1, "file_name": "x.png", "width": 8, "height": 8}], "categories": CATEGORIES,
            "annotations": annotations}
    tasks = TaskSet.from_dataset(CocoDataset.from_dict(data, "", "check-prompts"))
    return sorted({p for t in tasks for p in t.prompts()} | set(PROMPTS))


# --- the sections (each runs in its own process: `python -m talora.bench.gpu --name SECTION ...`) -------


def speed_section(plan: Plan, sam_type: str, with_job: bool) -> dict:
    """The speed suite at each of the plan's precisions on one model; {"machine", precision: speed}."""
    model = load_model(model_spec(sam_type))  # the shipped demo models where a variant has them, else random weights
    out: dict = {}
    for k, precision in enumerate(plan.precisions):
        job = with_job and k == 0
        config = speed.speed_config(
            sam_type, plan.device, num_images=plan.job_images if job else plan.timed_images,
            timed_images=plan.timed_images, min_run_time=plan.min_run_time, points_per_side=plan.points_per_side,
            batch_images=1, tasks_per_image=2, job=job, train_step=k == 0, precision=precision)
        results = speed.run_speed(config, model)
        out["machine"] = results["machine"]
        out[precision] = results["speed"]
    return out


def train_spec(plan: Plan, precision: str, data: dict, runs: str, steps: int):
    """The plan's training preset with a check's train section: a hypernet on a random base (the
    GPU plan; the dry run keeps the demo preset's shipped base), a few steps, one worker."""
    train = {"mode": "hypernet", "train_annotations": data["train"], "val_annotations": data["val"],
             "train_image_root": None, "val_image_root": None, "embeddings": None, "max_steps": steps,
             "batch_images": 1, "tasks_per_image": 2, "warmup_steps": 2, "val_every": plan.train_steps,
             "val_images": 1, "log_every": max(1, plan.train_steps // 3), "num_workers": 1,
             "use_gpu": plan.device == "cuda", "cpus_per_worker": plan.cpus_per_worker, "storage_path": runs,
             "name": f"hypernet-{precision}", "max_failures": 0, **AMP[precision]}
    model = {"sam": {"checkpoint": None}} if plan.device == "cuda" else {}
    return load_run_spec(read_bytes(str(REPO / plan.train_preset)).decode(), {"train": train, "model": model})


def train_section(plan: Plan) -> dict:
    """Ray Train hypernet runs at each AMP precision, then a relaunch that resumes the bf16 run."""
    tmp = tempfile.mkdtemp(prefix="talora-gpu-train-")
    data = write_demo_dataset(tmp, num_train=8, num_val=2, seed=5)
    init_ray()
    out: dict = {}
    for precision in TRAIN_PRECISIONS:
        try:
            summary = run_training(train_spec(plan, precision, data, os.path.join(tmp, "runs"), plan.train_steps))
        except Exception as e:  # fp16 on a random base may overflow: recorded, and the others still run
            out[precision] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:400]}"}
            continue
        metrics = summary["final_metrics"]
        out[precision] = {"steps": metrics["step"], "step_s_median": metrics["step_s_median"],
                          "steps_per_s": 1.0 / metrics["step_s_median"], "gpu_peak_gb": metrics.get("gpu_peak_gb"),
                          "loss": metrics["loss"], "run_seconds": summary["seconds"]}
    if "error" not in out.get("bf16", {"error": ""}):
        steps = plan.train_steps + plan.resume_steps
        try:
            summary = run_training(train_spec(plan, "bf16", data, os.path.join(tmp, "runs"), steps))
            metrics = summary["final_metrics"]
            out["resume"] = {"relaunch": summary["relaunch"], "start_step": metrics["start_step"],
                             "step": metrics["step"], "resumed": summary["relaunch"] and
                             metrics["start_step"] == plan.train_steps and metrics["step"] == steps}
        except Exception as e:
            out["resume"] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:400]}"}
    fp32, bf16 = out.get("fp32", {}).get("step_s_median"), out.get("bf16", {}).get("step_s_median")
    out["bf16_vs_fp32"] = fp32 / bf16 if fp32 and bf16 else None
    return out


def tests_section(plan: Plan) -> dict:
    """`pytest -m gpu tests/gpu` (collected only on the CPU: the GPU tests fail without CUDA, by design)."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider"]
    if plan.device != "cuda":
        command.append("--collect-only")
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    print(done.stdout + done.stderr, flush=True)  # into the section's log
    last = ([line for line in done.stdout.strip().splitlines() if line.strip()] or [""])[-1].strip("= ")
    found = re.findall(r"(\d+) (passed|failed|errors?|tests?|deselected)", last)
    counts = {word.rstrip("s"): int(n) for n, word in found}
    return {"returncode": done.returncode, "summary": last, "collected_only": plan.device != "cuda",
            **{k: counts.get(k, 0) for k in ("passed", "failed", "error", "test")}}


# --- the driver ---------------------------------------------------------------------------------------


def section_command(name: str, plan: Plan, json_path: Path) -> list[str]:
    plan_name = "dry" if plan is DRY else "gpu"
    base = [sys.executable, "-m", "talora.bench.gpu", "--plan", plan_name, "--json", str(json_path)]
    if name == "tests":
        return [*base, "--name", "tests"]
    if name == "train":
        return [*base, "--name", "train"]
    index = int(name.split("-")[1])
    return [*base, "--name", "speed", "--sam-type", plan.variants[index], *(["--job"] if index == 0 else [])]


def run_section(command: list[str], log, limit: float) -> str:
    """Runs a section in a process group of its own, so that a section past its limit is stopped
    with everything it started (pytest, Ray's processes) and holds no GPU memory for the next."""
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return f"timed out after {limit:.0f} s"
    return "ok" if code == 0 else f"failed (exit {code})"


def section_key(name: str, plan: Plan) -> str:
    return f"speed-{plan.variants[int(name.split('-')[1])]}" if name.startswith("speed-") else name


def run_check(out: str, dry_run: bool = False, prepared: dict | None = None, log=print) -> dict:
    """Every section within the plan's deadline; writes results.json, results.md and one log per
    section under `out` (a local folder: at most 8 files, what a device run brings back) and
    returns the results."""
    plan = plan_of(dry_run)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="talora-gpu-check-"))  # each section's JSON, merged into results.json
    started = time.perf_counter()
    gpu: dict = {"install": prepared or {}}
    sections: dict = {}
    for name in SECTIONS:
        key = section_key(name, plan)
        left = plan.deadline_s - (time.perf_counter() - started)
        limit = min(plan.limits.get(name, 120.0), left - 5)
        if limit < 20:
            sections[key] = {"status": "skipped", "why": f"{left:.0f} s left of the {plan.deadline_s:.0f} s deadline"}
            continue
        json_path = work / f"{key}.json"
        log(f"gpu-check: {key} (at most {limit:.0f} s)")
        t0 = time.perf_counter()
        with open(out_dir / f"{key}.log", "w") as section_log:
            status = run_section(section_command(name, plan, json_path), section_log, limit)
            if status == "ok" and not json_path.is_file():
                status = "failed (no results written)"
        sections[key] = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "log": f"{key}.log"}
        if json_path.is_file():
            gpu[key] = json.loads(json_path.read_text())
        if status != "ok":
            sections[key]["tail"] = (out_dir / f"{key}.log").read_text()[-1500:]
    gpu["targets"] = targets(gpu, plan)
    results = {"machine": next((gpu[k]["machine"] for k in gpu if isinstance(gpu[k], dict) and "machine" in gpu[k]),
                               None),
               "config": {"dry_run": dry_run, **{k: v for k, v in asdict(plan).items() if k != "limits"}},
               "sections": sections, "seconds": round(time.perf_counter() - started, 1), "gpu": gpu}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "results.md").write_text(markdown(results))
    return results


def _get(tree: dict, *path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def targets(gpu: dict, plan: Plan) -> dict:
    """Each target's value (None: not measured, with why), its bound, and met / missed by how much."""
    first, precision = f"speed-{plan.variants[0]}", plan.precisions[0]
    speed = _get(gpu, first, precision) or {}
    fast = _get(speed, "reference_fast") or {}
    job = _get(speed, "job") or {}
    breakdown = _get(speed, "breakdown") or {}
    device_s = sum(breakdown.get(f"{s}_s", 0.0) for s in ("trunk", "tail", "semantic_decode", "instance_decode"))
    rate = job.get("images_per_s")
    measured = {
        # (value, bound, "min" | "max", why a value is None)
        "one_prompt_vs_fast_reference": (fast.get("vs_fast_predictor"), 1.0, "min",
                                                fast.get("absent", "the speed section did not finish")),
        "k8_vs_k1": (_get(speed, "prompts", "8", "vs_one"), 2.0, "max", "the speed section did not finish"),
        "job_vs_floor": (job.get("vs_floor"), 0.85, "min", "no steady-state rate (see the job's numbers)"),
        "actor_device_utilisation": (device_s * rate if rate and device_s else None, 0.8, "min",
                                     "no steady-state job rate or breakdown"),
        "train_bf16_vs_fp32": (_get(gpu, "train", "bf16_vs_fp32"), 1.3, "min", "a training run did not finish"),
    }
    out = {}
    for name, (value, bound, kind, why) in measured.items():
        entry = {"value": value, "target": f"{'>=' if kind == 'min' else '<='} {bound:g}",
                 "variant": plan.train_variant if name.startswith("train") else plan.variants[0]}
        if value is None:
            entry.update(met=None, why=why)
        else:
            met = value >= bound if kind == "min" else value <= bound
            entry.update(met=met, missed_by=None if met else (bound / value if kind == "min" else value / bound))
        out[name] = entry
    return out


def markdown(results: dict) -> str:
    """results.md: the sections, the targets, then every number with its `gpu.` key."""
    machine = results["machine"] or {}
    lines = [f"# GPU check{' (dry run, CPU)' if results['config']['dry_run'] else ''}: "
             f"{machine.get('name', '?')} ({machine.get('device', '?')}), torch {machine.get('torch', '?')}, "
             f"Ray {machine.get('ray', '?')}, Python {machine.get('python', '?')}; {results['seconds']} s", "",
             "## Sections", ""]
    lines += table(["section", "status", "seconds"], [[k, v["status"] if v["status"] != "skipped" else
                                                       f"skipped: {v['why']}", v.get("seconds", "")]
                                                      for k, v in results["sections"].items()])
    lines += ["", "## Targets", ""]
    rows = []
    for name, t in results["gpu"]["targets"].items():
        verdict = ("not measured: " + t["why"] if t["met"] is None else "met" if t["met"]
                   else f"missed by {t['missed_by']:.2f}x")
        value = "" if t["value"] is None else f"{t['value']:.3g}"
        rows.append([name, t["variant"], value, t["target"], verdict])
    lines += table(["target", "variant", "value", "bound", "verdict"], rows)
    lines += ["", "## Every number", ""]
    numbers: list[list] = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers.append([prefix, f"{value:.4g}" if isinstance(value, float) else value])
        elif value is not None and not prefix.endswith(".machine"):
            numbers.append([prefix, str(value)[:120]])

    walk("gpu", {k: v for k, v in results["gpu"].items() if k != "targets"})
    lines += table(["key", "value"], numbers)
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def summary(results: dict) -> str:
    """One screen: sections, the headline numbers of each, the targets."""
    gpu, plan = results["gpu"], results["config"]
    lines = [f"gpu-check: {'dry run on the CPU' if plan['dry_run'] else 'GPU'} in {results['seconds']} s"]
    for name, s in results["sections"].items():
        lines.append(f"  {name:<22} {s['status']}" + (f" ({s['seconds']} s)" if "seconds" in s else ""))
    tests = gpu.get("tests") or {}
    if tests:
        lines.append(f"  tests/gpu: {tests.get('summary')}")
    for variant in plan["variants"]:
        for precision in plan["precisions"]:
            speed = _get(gpu, f"speed-{variant}", precision)
            if not speed:
                continue
            k = speed["prompts"]
            line = (f"  {variant} {precision}: floor {1 / speed['floor']['s_per_image']:.2f} img/s, K=1/2/4/8 "
                    + "/".join(f"{k[n]['s_per_image'] * 1e3:.0f}" for n in ("1", "2", "4", "8")) + " ms/img, "
                    f"vs SAM predictor {speed['reference']['vs_sam_predictor']:.2f}x")
            job = speed.get("job")
            if job:
                line += (f"; job {job['images']} img in {job['wall_s']:.1f} s, "
                         f"first commit {job['first_commit_s']:.1f} s, "
                         f"steady {_fmt(job['images_per_s'])} img/s, vs floor {_fmt(job['vs_floor'])}")
                shared = job.get("shared_gpu") or {}
                if "actors" in shared:
                    line += (f"; {shared['actors']} actors at 0.5 GPU: {_fmt(shared['images_per_s'])} img/s "
                             f"({_fmt(shared['vs_one_per_gpu'])}x one per GPU), status {shared['status']['state']}")
            lines.append(line)
    train = gpu.get("train") or {}
    for precision in TRAIN_PRECISIONS:
        run = train.get(precision)
        if run:
            lines.append(f"  train {plan['train_variant']} {precision}: " + (
                run["error"] if "error" in run else
                f"{run['steps_per_s']:.2f} steps/s, peak GPU {_fmt(run['gpu_peak_gb'])} GB, {run['steps']} steps"))
    if train.get("resume"):
        lines.append(f"  train resume: {train['resume']}")
    for name, t in gpu["targets"].items():
        verdict = ("not measured" if t["met"] is None else "met" if t["met"] else f"missed by {t['missed_by']:.2f}x")
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"  target {name}: {value} ({t['target']}) {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """One section, in its own process (run_check starts these)."""
    p = argparse.ArgumentParser(description="one section of the GPU check")
    p.add_argument("--name", choices=("tests", "speed", "train"), required=True)
    p.add_argument("--plan", choices=("gpu", "dry"), required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--sam-type")
    p.add_argument("--job", action="store_true")
    args = p.parse_args(argv)
    plan = plan_of(args.plan == "dry")
    if args.name == "tests":
        result = tests_section(plan)
    elif args.name == "train":
        result = train_section(plan)
    else:
        result = speed_section(plan, args.sam_type, args.job)
    Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
