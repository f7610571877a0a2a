"""The speed benchmark runs on the CPU and saves one positive median per hot path (its numbers are
reported, never asserted against a target: speed lives in benchmarks, not in timed tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from talora.bench.speed import median_seconds, run_speed, speed_config

REPO = Path(__file__).resolve().parents[2]


def test_the_speed_suite_reports_a_positive_median_per_hot_path():
    report = run_speed(speed_config("vit_tiny", "cpu", batch_images=2, min_run_time=0.01))
    assert report["device"] == "cpu" and report["sam_type"] == "vit_tiny" and report["batch_images"] == 2
    assert set(report["median_s"]) == {"label_image_s", "train_step_fp32_s", "pretrain_step_s"}
    assert all(v > 0 for v in report["median_s"].values()) and all(n >= 1 for n in report["timed_runs"].values())


def test_median_seconds_times_what_it_is_given():
    calls = []
    seconds, runs = median_seconds(lambda: calls.append(1), 0.01)
    assert runs >= 1 and len(calls) >= runs and 0 < seconds < 0.01


def test_a_preset_for_another_variant_is_refused_before_any_work(tmp_path):
    preset = (REPO / "configs" / "t4_vit_h.yaml").read_text()
    with pytest.raises(ValueError, match="is for vit_h; pass --sam-type vit_h"):
        speed_config("vit_tiny", "cpu", preset)
    out = tmp_path / "b.json"
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "benchmark.py"), "--device", "cpu", "--config",
                           str(REPO / "configs" / "t4_vit_h.yaml"), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 2 and "pass --sam-type vit_h" in done.stderr and not out.exists()


def test_the_benchmark_job_prints_and_saves_its_report(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "benchmark.py"), "--device", "cpu", "--skip-label",
                           "--batch-images", "2", "--min-run-time", "0.01", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["median_s"]) == {"train_step_fp32_s", "pretrain_step_s"}
    assert "train_step_fp32_s" in done.stdout and f"wrote {out}" in done.stdout
