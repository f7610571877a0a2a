"""The speed suite's plumbing on tiny inputs: every stable key, positive numbers, files written. Its
numbers are reported, never asserted against a target: speed lives in benchmarks, not in timed tests."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from talora.bench.speed import PROMPT_COUNTS, run_speed, speed_config, write_results
from talora.bench.timing import median_seconds
from tests.conftest import job_main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results():  # a whole speed-suite run: the tests that use it are slow
    config = speed_config("vit_tiny", "cpu", num_images=3, timed_images=2, batch_images=2, min_run_time=0.01,
                          job=False)  # the job part needs Ray: tests/integration/test_benchmark_job.py
    return run_speed(config)


@pytest.mark.slow
def test_the_speed_suite_reports_every_stable_key(results):
    speed = results["speed"]
    assert speed["floor"]["s_per_image"] > 0 and speed["floor"]["prompts"] == 2
    assert speed["naive"]["s_per_image"] > 0
    assert speed["naive"]["speedup"] > 0
    assert set(speed["prompts"]) == {str(k) for k in PROMPT_COUNTS} and speed["prompts"]["1"]["vs_one"] == 1.0
    assert all(v["s_per_image"] > 0 for v in speed["prompts"].values())
    reference = speed["reference"]
    assert reference["sam_predictor_s_per_image"] > 0 and reference["talora_semantic_s_per_image"] > 0
    assert reference["vs_sam_predictor"] > 0
    stages = {"decode_resize", "trunk", "tail", "semantic_decode", "instance_decode", "filter_nms_rle", "writing"}
    assert set(speed["breakdown"]) == {f"{s}_s" for s in stages} | {"sum_s"}
    assert all(v > 0 for v in speed["breakdown"].values())
    assert speed["eval"]["pycocotools_s"] > 0 and speed["eval"]["faster_coco_eval_s"] > 0
    assert speed["eval"]["equal"] is True
    train = speed["train"]
    assert train["cached_steps_per_s"] > 0 and train["on_the_fly_steps_per_s"] > 0
    assert train["pretrain_step_fp32_s"] > 0 and train["pretrain_step_bf16_s"] > 0 and train["step_bfloat16_s"] > 0
    assert train["pretrain_steps_per_s"] == 1.0 / train["pretrain_step_fp32_s"] and train["cpu_native_bf16"] in (True, False)
    assert speed["memory"]["process_peak_rss_mb"] > 0
    targets = speed["targets"]
    assert targets["job_vs_floor"] == {"value": None, "target": 0.85, "met": None}  # no job in this run
    bf16 = targets["pretrain_bf16_speed_vs_fp32"]
    assert bf16["value"] == train["pretrain_step_fp32_s"] / train["pretrain_step_bf16_s"] and bf16["target"] == 0.9
    cache = targets["cache_vs_on_the_fly"]
    assert cache["value"] > 0 and cache["target"] == 5.0 and cache["met"] in (True, False)
    assert results["machine"]["cores"] >= 1 and results["machine"]["ray"] and results["config"]["sam_type"] == "vit_tiny"


@pytest.mark.slow
def test_the_speed_suite_runs_on_sam2_against_sam2s_own_image_predictor():
    config = speed_config("sam2_tiny", "cpu", num_images=2, timed_images=1, batch_images=2, points_per_side=4,
                          min_run_time=0.01, job=False)
    results = run_speed(config)
    speed = results["speed"]
    assert results["config"]["sam_type"] == "sam2_tiny" and speed["floor"]["s_per_image"] > 0
    reference = speed["reference"]  # SAM2ImagePredictor on a SAM2Base holding the same weights
    assert reference["sam_predictor_s_per_image"] > 0 and reference["vs_sam_predictor"] > 0
    assert speed["breakdown"]["trunk_s"] > 0 and speed["train"]["pretrain_step_fp32_s"] > 0


def test_sam2s_reference_predictor_runs_the_same_base(text_encoder):
    """The reference is the same network: its masks equal talora's base decoder on one point."""
    import numpy as np
    import torch

    from talora.backbones import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("sam2_tiny")
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    predictor = backbone.reference_predictor()
    predictor.set_image(image)
    _, scores, logits = predictor.predict(point_coords=np.array([[64.0, 48.0]]), point_labels=np.array([1]),
                                          multimask_output=True, return_logits=True)  # columns 1.. of decode_rows
    x = predictor._transforms(image)  # its own resize (talora's differs by interpolation, not geometry)
    with torch.no_grad():
        embedding = backbone.embed_image(x[None])
        coords = torch.as_tensor(backbone.apply_coords(np.array([[[64.0, 48.0]]]), (96, 128)), dtype=torch.float32)
        sparse, dense = backbone.encode_prompts(coords, torch.ones(1, 1, dtype=torch.int), None)
        masks, iou, _ = backbone.decode_rows(embedding, sparse, dense)
    np.testing.assert_allclose(masks[0, 1:].numpy(), logits, atol=1e-4)
    np.testing.assert_allclose(iou[0, 1:].numpy(), scores, atol=1e-5)


@pytest.mark.slow
def test_results_are_written_as_json_markdown_and_a_plot(results, tmp_path):
    files = write_results(results, str(tmp_path / "bench"))
    assert json.loads((tmp_path / "bench" / "results.json").read_text())["speed"] == results["speed"]
    text = (tmp_path / "bench" / "results.md").read_text()
    assert "| speed.floor.s_per_image |" in text and "| speed.naive.speedup |" in text
    assert (tmp_path / "bench" / "prompts.png").read_bytes()[:4] == b"\x89PNG" and len(files) == 3


def test_median_seconds_times_what_it_is_given():
    calls = []
    seconds, runs = median_seconds(lambda: calls.append(1), 0.01)
    assert runs >= 1 and len(calls) >= runs and 0 < seconds < 0.01


def test_bad_settings_are_refused_before_any_work(tmp_path):
    preset = (REPO / "configs" / "t4_vit_h.yaml").read_text()
    with pytest.raises(ValueError, match="is for vit_h; pass --sam-type vit_h"):
        speed_config("vit_tiny", "cpu", preset)
    with pytest.raises(ValueError, match="--prompts must be in"):
        speed_config("vit_tiny", "cpu", prompts=9)
    out = tmp_path / "b"
    for argv, message in ((["--config", str(REPO / "configs" / "t4_vit_h.yaml")], "pass --sam-type vit_h"),
                          (["--num-images", "0"], "--num-images must be >= 1")):
        code, err = job_main("benchmark", [*argv, "--out", str(out)])
        assert code == 2 and message in err, (argv, err[-1000:])
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "benchmark.py"), "--images", str(tmp_path / "missing"),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)  # as a shell sees it
    assert done.returncode == 2 and "no such image prefix" in done.stderr, done.stderr[-1000:]
    assert not out.exists()


def test_the_naive_loop_shares_and_caches_nothing_across_prompts(text_encoder):
    import numpy as np
    import torch

    from talora.bench.speed.references import naive_image
    from talora.config import default_config
    from talora.model.loading import build_task_aware_sam
    from talora.predict.predictor import PredictConfig, TaskAwarePredictor

    torch.manual_seed(0)
    model = build_task_aware_sam(default_config("vit_tiny"), text_encoder)
    predictor = TaskAwarePredictor(model, PredictConfig(points_per_side=2))
    calls = {"text": 0, "trunk": 0}
    encode, embed_trunk = text_encoder.encode, model.embed_trunk

    def counted(name, fn):
        def call(*args):
            calls[name] += 1
            return fn(*args)
        return call

    text_encoder.encode, model.embed_trunk = counted("text", encode), counted("trunk", embed_trunk)
    try:
        image = np.zeros((32, 48, 3), np.uint8)
        for _ in range(2):  # two images
            naive_image(predictor, predictor.resize(image), image.shape[:2], ["segment cars", "segment fruit"])
        assert calls == {"text": 4, "trunk": 4}  # per image and prompt: the text encoder and the whole encoder
        predictor.predict(image, ["segment cars", "segment fruit"])
        calls.update(text=0, trunk=0)
        predictor.predict(image, ["segment cars", "segment fruit"])  # the floor: one trunk pass, adapters cached
        assert calls == {"text": 0, "trunk": 1}
    finally:
        text_encoder.encode = encode


def test_the_speed_suite_times_a_detector_against_its_own_processor_with_its_own_stages():
    """SAM 3 (sam3_tiny): the reference is the package's Sam3Processor (one image, one text prompt),
    the detector replaces the semantic and instance decodes in the breakdown, and the training
    steps include its category-name pretraining."""
    config = speed_config("sam3_tiny", "cpu", num_images=2, timed_images=1, batch_images=2, min_run_time=0.01,
                          job=False)
    speed = run_speed(config)["speed"]
    assert speed["floor"]["s_per_image"] > 0 and speed["prompts"]["4"]["vs_one"] > 0
    assert speed["reference"]["sam_predictor_s_per_image"] > 0 and speed["reference"]["vs_sam_predictor"] > 0
    stages = {"decode_resize", "trunk", "tail", "detect", "filter_nms_rle", "writing"}
    assert set(speed["breakdown"]) == {f"{s}_s" for s in stages} | {"sum_s"}
    assert all(v > 0 for v in speed["breakdown"].values())
    train = speed["train"]
    assert train["cached_steps_per_s"] > 0 and train["pretrain_step_fp32_s"] > 0 and train["pretrain_step_bf16_s"] > 0


def test_sam3s_reference_processor_finds_what_the_talora_path_finds_with_no_adapter(text_encoder):
    """The reference runs the same base: at an open threshold the package's Sam3Processor keeps as
    many instances as sigmoid(score) x presence passes, and they match talora's zero-adapter scores."""
    import numpy as np
    import torch

    from talora.config import default_config
    from talora.model.loading import build_task_aware_sam

    torch.manual_seed(0)
    model = build_task_aware_sam(default_config("sam3_tiny"), text_encoder).eval()
    reference = model.backbone.reference_predictor()
    image = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    reference.processor.confidence_threshold = 0.0
    reference.set_image(image)
    state = reference.predict_text("segment cars")
    with torch.no_grad():
        x, _ = model.preprocess(image)
        embeddings = model.backbone.embed_image(x[None])
        found = model.backbone.detect_rows(embeddings, model.backbone.text_features(["segment cars"]))
    ours = torch.sigmoid(found.scores[0]) * torch.sigmoid(found.presence_logits[0])
    assert torch.allclose(state["scores"].sort().values, ours.sort().values, atol=1e-4)
