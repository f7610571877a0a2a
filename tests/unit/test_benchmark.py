"""The benchmark job runs on the CPU and saves one positive median per hot path (its numbers are
reported, never asserted against a target: speed lives in benchmarks, not in timed tests)."""

import json
from pathlib import Path

import pytest

from jobs.benchmark import main

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_prints_and_saves_a_median_per_hot_path(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--repeats", "1", "--warmup", "0", "--batch-images", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["sam_type"] == "vit_tiny" and report["batch_images"] == 2
    assert set(report["median_s"]) == {"label_image_s", "train_step_fp32_s", "pretrain_step_s"}
    assert all(v > 0 for v in report["median_s"].values())
    printed = capsys.readouterr().out
    assert "label_image_s" in printed and f"wrote {out}" in printed


def test_a_preset_for_another_variant_is_refused_before_any_work(tmp_path):
    preset = str(REPO / "configs" / "t4_vit_h.yaml")
    with pytest.raises(SystemExit, match="is for vit_h; pass --sam-type"):
        main(["--device", "cpu", "--config", preset, "--out", str(tmp_path / "b.json")])
    assert not (tmp_path / "b.json").exists()
