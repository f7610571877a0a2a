"""`make gpu-check DRY=1`: the GPU check's whole script on the CPU with the tiny presets, so every
session proves it works before a device is lent (tests/unit/test_gpu_check.py tests its parts)."""

import json
import os
import subprocess
import sys

import pytest

from talora.bench.gpu import DRY, TRAIN_PRECISIONS
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(1200)
def test_the_dry_run_runs_every_section_and_writes_every_number_under_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as on the device
    done = subprocess.run([sys.executable, "jobs/gpu_check.py", "run", "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    sections = results["sections"]
    assert list(sections) == ["tests", *(f"speed-{v}" for v in DRY.variants[:1]), "train",
                              *(f"speed-{v}" for v in DRY.variants[1:])]
    assert all(s["status"] == "ok" for s in sections.values()), sections
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["results.json", "results.md", *(f"{k}.log" for k in sections)])  # what a device run brings back: <= 8 files

    gpu = results["gpu"]
    assert gpu["tests"]["collected_only"] and gpu["tests"]["test"] >= 9 and gpu["tests"]["returncode"] == 0
    for variant in DRY.variants:
        for precision in DRY.precisions:
            speed = gpu[f"speed-{variant}"][precision]
            assert speed["floor"]["s_per_image"] > 0 and set(speed["prompts"]) == {"1", "2", "4", "8"}
            assert speed["reference"]["vs_sam_predictor"] > 0 and speed["breakdown"]["trunk_s"] > 0
            assert "absent" in speed["reference_fast"]  # segment-anything-fast is not installed here
        assert "cached_steps_per_s" in gpu[f"speed-{variant}"][DRY.precisions[0]]["train"]
    job = gpu[f"speed-{DRY.variants[0]}"][DRY.precisions[0]]["job"]
    assert job["images"] == DRY.job_images and job["errors"] == 0 and job["wall_s"] > 0

    train = gpu["train"]
    for precision in TRAIN_PRECISIONS:
        assert train[precision]["steps"] == DRY.train_steps and train[precision]["steps_per_s"] > 0, train[precision]
        assert train[precision]["gpu_peak_gb"] is None  # a CPU worker
    assert train["resume"] == {"relaunch": True, "start_step": DRY.train_steps,
                               "step": DRY.train_steps + DRY.resume_steps, "resumed": True}
    assert train["bf16_vs_fp32"] == pytest.approx(train["fp32"]["step_s_median"] / train["bf16"]["step_s_median"])

    assert set(gpu["targets"]) == {"one_prompt_vs_fast_reference", "k8_vs_k1", "job_vs_floor",
                                   "actor_device_utilisation", "train_bf16_vs_fp32"}
    for target in gpu["targets"].values():
        assert (target["value"] is None) == (target["met"] is None) and (target["met"] is not None or target["why"])
    report = (tmp_path / "results.md").read_text()
    assert "## Targets" in report and "gpu.train.resume.start_step" in report
    assert "gpu-check: dry run on the CPU" in done.stdout and "target k8_vs_k1" in done.stdout
