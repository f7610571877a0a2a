"""The quality suite end to end on a local Ray: a hypernet trained on a dataset the shipped models
never saw (no attributes, real-photo-like fixture), a static-LoRA oracle, and the ablation hypernets."""

import json

import pytest

from tests.conftest import REPO, run_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_quality_suite_trains_a_hypernet_an_oracle_and_the_ablations_on_another_dataset(ray_cluster, tmp_path):
    coco3 = str(REPO / "tests/fixtures/coco3/instances.json")
    out = tmp_path / "bench"
    done = run_job("benchmark", ["--suite", "quality", "--train-annotations", coco3, "--val-annotations", coco3,
                                 "--hypernet-steps", "2", "--oracle-task", "category:car", "--oracle-steps", "2",
                                 "--ablations", "--ablation-steps", "1", "--val-images", "2", "--points-per-side", "4",
                                 "--out", str(out)], ray_cluster)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    quality, config = results["quality"], results["config"]
    assert config["hypernet"].startswith(str(out / "train" / "hypernet-")) and config["hypernet_steps"] == 2
    assert config["sam_checkpoint"] == "demo://sam_vit_tiny.safetensors"
    assert quality["groups"]["heldout_composition"] is None
    assert quality["groups"]["seen"]["hypernet"]["tasks"] == 6
    (oracle,) = quality["oracles"]
    assert oracle["task"] == "category:car" and 0.0 <= oracle["oracle_miou"] <= 1.0
    assert oracle["hypernet_miou"] == quality["hypernet_per_task"]["seen"]["category:car"]
    ablations = quality["ablations"]
    assert ablations["steps"] == 1
    assert {k: v["tail_blocks"] for k, v in ablations.items() if k != "steps"} == {
        "lora": 1, "tucker": 1, "decoder_only": 0, "tail_k1": 1, "tail_k2": 2}  # vit_tiny's default k is 1
    assert ablations["tucker"]["generated_values_per_adapter"] < ablations["lora"]["generated_values_per_adapter"]
    assert ablations["tail_k1"]["miou_seen"] == ablations["lora"]["miou_seen"]  # the same spec: one run, reused
    assert all(v["s_per_prompt"] > 0 for k, v in ablations.items() if k != "steps")
    runs = [p.name.split("-")[0] for p in (out / "train").iterdir()]
    assert sorted(runs) == ["ablation"] * 4 + ["hypernet", "oracle"]
    assert "| oracle task |" in (out / "results.md").read_text()
