"""CUDA twins of CPU tests: the AMP training steps (hypernet and pretraining) and the label
predictor on a GPU. Marked `gpu`: CI deselects them (`-m "not gpu"`, no GPU there); run them with
`pytest -m gpu tests/gpu` on a machine with CUDA. Without one they fail rather than skip."""

import copy

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from talora.config import default_config
from talora.data.coco import CocoDataset
from talora.io.images import decode_image
from talora.data.synthetic import make_split
from talora.model.loading import build_task_aware_sam, load_backbone, load_model, model_spec
from talora.predict.predictor import PredictConfig, TaskAwarePredictor
from talora.train.config import TrainConfig
from talora.train.optim import autocast, backward_and_step, grad_scaler
from talora.train.pretrain import (
    ImageMemo,
    PretrainStep,
    build_pretrain_batch,
    label_vocab,
)
from talora.train.step import TrainStep
from tests.unit.test_training_step import _batch, demo  # noqa: F401  (the CPU twin's fixture)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda():
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device"
    return torch.device("cuda")


def _amp_steps(step, make_loss, config, cuda, steps=20):
    """AMP steps as the training loops take them; (losses, steps taken). Under fp16 the first steps
    may be skipped while the scaler backs off from its initial scale."""
    optimiser = torch.optim.AdamW(step.parameters(), lr=config.lr)
    scaler = grad_scaler(config, cuda)
    losses, taken = [], 0
    for _ in range(steps):
        with autocast(config, cuda):
            loss = make_loss()
        assert loss.dtype == torch.float32
        losses.append(loss.item())
        taken += backward_and_step(loss, scaler, optimiser, step.parameters(), 1.0)
    return losses, taken


def _hypernet_step(demo, cuda):  # noqa: F811
    torch.manual_seed(0)
    model = build_task_aware_sam(default_config("vit_tiny"))  # random base: large activations
    batch = _batch(model, demo)
    model.to(cuda)
    return TrainStep(model, model.hypernet), batch.to(cuda), torch.randn(len(batch.prompts), 384, device=cuda)


@pytest.mark.parametrize("amp_dtype", ["float16", "bfloat16"])
def test_hypernet_step_under_cuda_amp_matches_fp32(demo, cuda, amp_dtype):  # noqa: F811
    step, batch, text = _hypernet_step(demo, cuda)
    config = TrainConfig(train_annotations="x", amp=True, amp_dtype=amp_dtype)
    with torch.no_grad():
        full = step(batch, text, config)["loss"]
        with autocast(config, cuda):
            half = step(batch, text, config)["loss"]
    assert abs(half.item() - full.item()) < 2e-2 * full.item()


def test_bf16_amp_learns_where_fp16_overflows_and_stops_with_advice(demo, cuda):  # noqa: F811
    """Measured: random base, lr 3e-3 -> the adapted encoder tail's MLP output passes 65504 within
    a few steps. bf16 (fp32's range) trains through it; fp16 stops with a clear error rather than
    skipping every later step."""
    step, batch, text = _hypernet_step(demo, cuda)
    config = TrainConfig(train_annotations="x", amp=True, amp_dtype="bfloat16", lr=3e-3)
    losses, taken = _amp_steps(step, lambda: step(batch, text, config)["loss"], config, cuda)
    assert taken == 20 and losses[-1] < 0.85 * losses[0], losses

    step, batch, text = _hypernet_step(demo, cuda)
    config = TrainConfig(train_annotations="x", amp=True, amp_dtype="float16", lr=3e-3)
    with pytest.raises(FloatingPointError, match="amp_dtype: bfloat16"):
        _amp_steps(step, lambda: step(batch, text, config)["loss"], config, cuda, steps=40)


def test_fp16_amp_trains_at_the_demo_learning_rate(demo, cuda):  # noqa: F811
    step, batch, text = _hypernet_step(demo, cuda)
    config = TrainConfig(train_annotations="x", amp=True, amp_dtype="float16", lr=3e-4)
    losses, taken = _amp_steps(step, lambda: step(batch, text, config)["loss"], config, cuda)
    assert taken >= 15 and losses[-1] < losses[0], losses


def test_pretrain_step_under_cuda_amp_learns(tmp_path, cuda):
    from talora.data.synthetic import write_demo_dataset

    written = write_demo_dataset(str(tmp_path), num_train=4, num_val=1, seed=5)
    dataset = CocoDataset.load(written["train"])
    torch.manual_seed(0)
    backbone = load_backbone("vit_tiny")
    backbone.model.requires_grad_(True)  # pretraining trains the whole SAM, as PretrainMode does
    vocab = label_vocab(dataset)
    memo = ImageMemo(backbone, dataset, vocab, None)
    entries = [memo(i) for i in dataset.image_ids]
    batch = build_pretrain_batch(entries, np.random.default_rng(0), 4, 0.5, backbone.image_size).to(cuda)
    step = PretrainStep(backbone, 1, vocab).to(cuda)
    config = TrainConfig(train_annotations="x", mode="pretrain", amp=True, lr=3e-3)
    losses, taken = _amp_steps(step, lambda: step(batch, config)["loss"], config, cuda)
    assert taken >= 15 and losses[-1] < 0.85 * losses[0], losses


def test_shipped_models_predict_the_same_masks_on_cuda_as_on_cpu(cuda):
    coco, files = make_split(4, seed=3)
    images = [decode_image(files[i["file_name"]]) for i in coco["images"]]
    prompts = ["segment vehicles", "segment red objects"]
    cpu_model = load_model(model_spec("vit_tiny"), None)
    gpu_model = copy.deepcopy(cpu_model).to(cuda)
    cpu, gpu = TaskAwarePredictor(cpu_model, PredictConfig()), TaskAwarePredictor(gpu_model, PredictConfig())
    compared = 0
    for image in images:
        a, b = cpu.predict(image, prompts), gpu.predict(image, prompts)
        for prompt in prompts:
            sem_a = [d for d in a[prompt] if d.kind == "semantic"]
            sem_b = [d for d in b[prompt] if d.kind == "semantic"]
            assert len(sem_a) == len(sem_b), prompt
            for x, y in zip(sem_a, sem_b):
                iou = mask_utils.iou([x.rle], [y.rle], [0])[0, 0]
                assert iou > 0.98 and abs(x.score - y.score) < 1e-3
                compared += 1
            assert abs(len(a[prompt]) - len(b[prompt])) <= 1  # instances: thresholds may flip one
    assert compared >= 2


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_on_cuda_gives_the_fp32_masks(cuda, precision):
    # The GPU half of tests/unit/test_predict.py::test_bf16_autocast_gives_the_fp32_masks, on a batch.
    coco, files = make_split(6, seed=3)
    images = [decode_image(files[i["file_name"]]) for i in coco["images"]]
    model = load_model(model_spec("vit_tiny"), None).to(cuda)
    fp32 = TaskAwarePredictor(model, PredictConfig())
    low = TaskAwarePredictor(model, PredictConfig(precision=precision))
    prompts = ["segment vehicles", "segment red objects"]
    items = [(fp32.resize(image), image.shape[:2]) for image in images]
    a, b = fp32.predict_batch(items, prompts), low.predict_batch(items, prompts)
    ious = []
    for x, y in zip(a, b):
        for prompt in prompts:
            sx = [d.rle for d in x[prompt] if d.kind == "semantic"]
            sy = [d.rle for d in y[prompt] if d.kind == "semantic"]
            assert len(sx) == len(sy)
            if sx:
                ious.append(mask_utils.iou(sx, sy, [0])[0, 0])
    assert len(ious) >= 3 and min(ious) >= 0.98


def test_trunk_memo_keeps_gpu_features_in_cpu_memory_and_validation_scores_them_as_on_the_cpu(tmp_path, cuda):
    """CUDA twin of tests/unit/test_memo.py: features computed on the GPU are held in CPU memory
    (not GPU memory), and validation moves each image's back, scoring what the CPU scores."""
    from talora.data.synthetic import write_demo_dataset
    from talora.adapters.static import StaticLora
    from talora.data.tasks import TaskSet
    from talora.train.memo import TrunkMemo
    from talora.train.validate import validate, validation_rows

    val = CocoDataset.load(write_demo_dataset(str(tmp_path), num_train=0, num_val=2, seed=0)["val"])
    torch.manual_seed(0)
    cpu_model = build_task_aware_sam(default_config("vit_tiny")).eval()
    lora = StaticLora(cpu_model.targets, cpu_model.config.lora.rank, cpu_model.config.lora.scale)
    rows = validation_rows(list(TaskSet.from_dataset(val)), static=True)
    scores = []
    for device in (torch.device("cpu"), cuda):
        model = copy.deepcopy(cpu_model).to(device)
        memo = TrunkMemo(model, val, None, device, 2**40)
        entries = [(val.images[i], *memo(i)) for i in val.image_ids]
        assert all(trunk.device.type == "cpu" for _, trunk, _ in entries)
        ious = validate(TrainStep(model, copy.deepcopy(lora).to(device)).eval(), entries, val, rows, None, chunk=4)
        scores.append(ious.per_key())
    for key, value in scores[0].items():
        assert abs(value - scores[1][key]) < 0.02, key
