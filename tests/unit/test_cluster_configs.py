"""Cluster launcher YAML, KubeRay RayJobs, runtime env and training presets are valid as shipped."""

import json
import os
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from talora.train.config import load_run_spec

REPO = Path(__file__).resolve().parents[2]


def test_the_aws_launcher_config_validates_against_rays_own_schema():
    schema = json.loads((Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert types["head"]["resources"]["CPU"] == 0  # no model on the head
    assert types["label_t4"]["node_config"]["InstanceType"].startswith("g4dn") and types["label_t4"]["resources"]["GPU"] == 1
    assert types["train_a100"]["resources"]["GPU"] == 8
    assert all(t["min_workers"] <= t["max_workers"] for n, t in types.items() if n != "head")
    assert any("requirements.lock" in c for c in config["setup_commands"])
    assert (REPO / "cluster" / "requirements.lock").exists()
    text = (REPO / "cluster" / "aws-gpu.yaml").read_text().lower()
    assert "secret" not in text and "access_key" not in text  # credentials come from the instance role


@pytest.mark.parametrize("name, gpus", [("kuberay-label-job.yaml", 1), ("kuberay-train-job.yaml", 8)])
def test_rayjob_manifests_have_the_required_fields_and_entrypoints_that_exist(name, gpus):
    job = yaml.safe_load((REPO / "cluster" / name).read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and (REPO / argv[1]).is_file()
    if "--config" in argv:
        load_run_spec((REPO / argv[argv.index("--config") + 1]).read_text())
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert worker["limits"]["nvidia.com/gpu"] == gpus == worker["requests"]["nvidia.com/gpu"]
    if "--gpus-per-actor" in argv:  # actors per GPU fit the worker's GPUs
        assert float(argv[argv.index("--gpus-per-actor") + 1]) <= gpus
    if "--num-workers" in argv:
        assert int(argv[argv.index("--num-workers") + 1]) == gpus


def test_runtime_env_excludes_the_heavy_folders_and_holds_no_secret():
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert {".venv", "data", "runs", ".git"} <= set(env["excludes"])
    assert not any("SECRET" in k or "KEY" in k for k in env.get("env_vars", {}))


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_training_preset_loads_and_validates(preset):
    spec = load_run_spec((REPO / "configs" / preset).read_text())
    assert spec.train.max_steps > 0 and spec.model.sam.sam_type in ("vit_tiny", "vit_h")
    if spec.train.use_gpu:
        assert spec.train.amp  # T4 / A100 presets train with AMP: fp16 on the T4 (no bf16), bf16 on the A100
        assert spec.train.amp_dtype == ("float16" if preset.startswith("t4") else "bfloat16")
    if preset == "demo_pretrain.yaml":  # the demo base: the whole vit_tiny SAM, from random init
        assert spec.train.mode == "pretrain" and spec.model.sam.checkpoint is None and spec.train.aux_weight > 0
    if preset == "demo_cpu.yaml":  # the demo hypernet, on the shipped base
        assert spec.train.mode == "hypernet" and spec.model.sam.checkpoint == "demo://sam_vit_tiny.safetensors"
    if preset == "t4_vit_h.yaml":  # 16 GB: the trunk comes from the embedding cache, small TA-LoRA heads
        assert spec.train.embeddings and spec.model.hypernet.adapter_type == "tucker"


def test_the_demo_presets_are_what_make_demo_models_runs():
    makefile = (REPO / "Makefile").read_text()
    assert "configs/demo_pretrain.yaml" in makefile and "configs/demo_cpu.yaml" in makefile
    assert "demo-models" not in makefile.split("\ntest:")[1].split("\n\n")[0]  # never part of make test
