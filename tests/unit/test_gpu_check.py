"""The GPU check's parts that need no GPU: what the carry holds, how it installs, the prompts its
text table must cover, the fast reference's seam, and the targets' verdicts. The whole script runs
on the CPU in tests/integration/test_gpu_check.py."""

import json
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from talora.bench import carry
from talora.bench.gpu import DRY, check_prompts, targets


def _wheel(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    """A minimal pure wheel holding `files` (path -> text), with its metadata and RECORD."""
    dist = f"{name}-0.1.dist-info"
    files = {**files, f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n"
    path = tmp_path / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for inside, text in {**files, f"{dist}/RECORD": record}.items():
            z.writestr(inside, text)
    return path


def test_strip_wheel_drops_the_folders_and_their_record_lines_and_the_wheel_still_installs(tmp_path):
    wheel = _wheel(tmp_path, "raylike", {"raylike/__init__.py": "VALUE = 7\n", "raylike/jars/big.jar": "x" * 5000,
                                         "raylike/serve/__init__.py": ""})
    before, after = carry.strip_wheel(wheel, ("raylike/jars/", "raylike/serve/"))
    assert after < before
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        record = z.read("raylike-0.1.dist-info/RECORD").decode()
    assert "raylike/__init__.py" in names and not any("/jars/" in n or "/serve/" in n for n in names)
    assert "jars" not in record and "serve" not in record and "raylike/__init__.py" in record
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target",
                    str(site), str(wheel)], check=True)
    assert (site / "raylike" / "__init__.py").read_text() == "VALUE = 7\n" and not (site / "raylike" / "jars").exists()


def test_the_carry_is_what_the_check_imports_beyond_the_device_image():
    carried = carry.carry_closure()
    # Ray and its dependencies the image lacks (ray[train] needs pydantic, ray core jsonschema -> rpds-py)
    assert {"ray", "jsonschema", "rpds-py", "pydantic", "pydantic-core", "tensorboardx"} <= set(carried)
    # the SAM packages and sam2's configuration stack
    assert {"segment-anything", "sam2", "hydra-core", "omegaconf", "antlr4-python3-runtime", "iopath",
            "pycocotools"} <= set(carried)
    # what the image brings, and torch's CUDA family, never travel
    assert not {"numpy", "pyarrow", "fsspec", "protobuf", "torch", "torchvision", "click"} & set(carried)
    assert carried["ray"] == __import__("ray").__version__
    # an image without numpy: numpy is carried (the closure is computed, not listed)
    assert "numpy" in carry.carry_closure(device_image=carry.DEVICE_IMAGE - {"numpy"})


def _manifest(carry_dir: Path, wheels: list[Path], python: str) -> None:
    (carry_dir / "wheels").mkdir(parents=True, exist_ok=True)
    for w in wheels:
        w.rename(carry_dir / "wheels" / w.name)
    (carry_dir / carry.MANIFEST).write_text(json.dumps({"python": python, "wheels": {w.name: 1 for w in wheels},
                                                        "digest": "d1"}))


def test_install_puts_every_carried_wheel_on_the_target_once_and_refuses_another_python(tmp_path):
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    _manifest(tmp_path / "carry", [_wheel(tmp_path, "probe_a", {"probe_a/__init__.py": ""}),
                                   _wheel(tmp_path, "probe_b", {"probe_b/__init__.py": ""})], running)
    site = tmp_path / "site"
    assert carry.install(tmp_path / "carry", site)["installed"] == 2
    assert (site / "probe_a").is_dir() and (site / "probe_b").is_dir()
    assert carry.install(tmp_path / "carry", site) == {"reused": "d1"}  # a warm machine keeps its install

    _manifest(tmp_path / "other", [_wheel(tmp_path, "probe_c", {"probe_c/__init__.py": ""})], "2.7")
    with pytest.raises(ValueError, match=rf"built for Python 2.7, but this python .* is {running}"):
        carry.install(tmp_path / "other", site)
    with pytest.raises(FileNotFoundError, match="make gpu-carry"):
        carry.install(tmp_path / "nowhere", site)


def test_activate_changes_nothing_where_every_module_is_importable(tmp_path):
    environ: dict = {}
    assert carry.activate(tmp_path / "absent-carry", tmp_path / "site", environ) == {"missing": []}
    assert environ == {} and not (tmp_path / "site").exists()


def test_the_text_table_covers_every_prompt_of_any_demo_dataset():
    from talora.data.coco import CocoDataset
    from talora.data.synthetic import SyntheticConfig, make_split
    from talora.data.tasks import TaskSet

    covered = set(check_prompts())
    for palette in ("demo", "other"):
        coco, _ = make_split(30, seed=3, config=SyntheticConfig(palette=palette))
        tasks = TaskSet.from_dataset(CocoDataset.from_dict(coco, "", "test"))
        assert {p for t in tasks for p in t.prompts()} <= covered
    assert "segment vehicles" in covered and "where are the red cars?" in covered


def test_the_fast_reference_is_measured_where_segment_anything_fast_is_installed(monkeypatch):
    from segment_anything import SamPredictor

    from talora.bench.speed import speed_config
    from talora.bench.speed.references import fast_reference
    from talora.model.loading import load_model, model_spec

    model = load_model(model_spec("vit_tiny"))
    images = [np.full((64, 96, 3), 120, np.uint8)]
    config = speed_config("vit_tiny", "cpu", min_run_time=0.01, precision="bf16")
    reference = {"talora_semantic_s_per_image": 0.5}
    assert "not importable" in fast_reference(model, images, config, reference)["absent"]

    built = []

    def build_fast():  # the drop-in registry's shape: a Sam of the variant
        built.append(model.backbone.variant.name)
        return load_model(model_spec("vit_tiny")).backbone.model

    fake = types.ModuleType("segment_anything_fast")
    fake.SamPredictor, fake.sam_model_fast_registry = SamPredictor, {"vit_tiny": build_fast}
    monkeypatch.setitem(sys.modules, "segment_anything_fast", fake)
    measured = fast_reference(model, images, config, reference)  # the fast model brings its own precision
    assert built == ["vit_tiny"] and measured["fast_predictor_s_per_image"] > 0
    assert measured["vs_fast_predictor"] == pytest.approx(measured["fast_predictor_s_per_image"] / 0.5)
    fp32 = speed_config("vit_tiny", "cpu", min_run_time=0.01, precision="fp32")
    assert "bf16" in fast_reference(model, images, fp32, reference)["absent"]


def test_targets_say_met_or_by_how_much_missed_and_why_a_value_is_absent():
    speed = {"prompts": {"8": {"vs_one": 2.5}}, "reference_fast": {"absent": "not installed"},
             "job": {"vs_floor": 0.9, "images_per_s": 10.0},
             "breakdown": {"trunk_s": 0.05, "tail_s": 0.01, "semantic_decode_s": 0.01, "instance_decode_s": 0.01,
                           "filter_nms_rle_s": 0.5}}
    gpu = {f"speed-{DRY.variants[0]}": {DRY.precisions[0]: speed}, "train": {"bf16_vs_fp32": 1.3}}
    out = targets(gpu, DRY)
    assert out["k8_vs_k1"]["met"] is False and out["k8_vs_k1"]["missed_by"] == pytest.approx(1.25)
    assert out["job_vs_floor"]["met"] is True
    assert out["actor_device_utilisation"]["value"] == pytest.approx(0.8) and out["actor_device_utilisation"]["met"]
    assert out["train_bf16_vs_fp32"]["met"] is True
    fast = out["one_prompt_vs_fast_reference"]
    assert fast["value"] is None and fast["met"] is None and fast["why"] == "not installed"


def test_the_gpu_plan_trains_a_random_vit_h_with_the_t4_preset_model_and_fits_its_8_minutes(tmp_path):
    from talora.bench.gpu import GPU, SECTIONS, section_command, section_key, train_spec

    spec = train_spec(GPU, "fp16", {"train": "t.json", "val": "v.json"}, str(tmp_path), GPU.train_steps)
    assert spec.model.sam.sam_type == "vit_h" and spec.model.sam.checkpoint is None  # random weights
    assert spec.model.hypernet.adapter_type == "tucker" and spec.model.tail_blocks == 4  # the preset's model
    train = spec.train
    assert train.use_gpu and train.amp and train.amp_dtype == "float16" and train.embeddings is None
    assert (train.max_steps, train.batch_images, train.tasks_per_image, train.num_workers) == (30, 1, 2, 1)
    keys = [section_key(name, GPU) for name in SECTIONS]
    assert keys == ["tests", "speed-vit_h", "train", "speed-sam2.1_hiera_l", "speed-sam3"]
    assert sum(GPU.limits[name] for name in SECTIONS) <= GPU.deadline_s <= 480 - 20  # the install comes before
    command = section_command("speed-0", GPU, tmp_path / "x.json")
    assert command[command.index("--sam-type") + 1] == "vit_h" and "--job" in command
    assert "--job" not in section_command("speed-1", GPU, tmp_path / "x.json")
    assert command[command.index("--plan") + 1] == "gpu"


def test_a_section_past_its_limit_is_stopped_with_the_processes_it_started(tmp_path):
    import os
    import time

    from talora.bench.gpu import run_section

    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
              f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(600)")
    with open(tmp_path / "log", "w") as log:
        # the section records its child's pid before the limit: the limit is long enough on a busy machine
        status = run_section([sys.executable, "-c", script], log, limit=10)
    assert status == "timed out after 10 s"
    child = int(pid_file.read_text())
    for _ in range(100):  # SIGKILL is delivered asynchronously: wait on the process's state, not a clock
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if open(f"/proc/{child}/stat").read().split()[2] == "Z":
            break  # killed, not yet reaped by its (killed) parent's reaper
        time.sleep(0.05)
    else:
        raise AssertionError(f"the section's child {child} outlived it")
    with open(tmp_path / "log", "w") as log:
        assert run_section([sys.executable, "-c", "raise SystemExit(3)"], log, limit=20) == "failed (exit 3)"
