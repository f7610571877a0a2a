import numpy as np
from segment_anything.utils.transforms import ResizeLongestSide

from talora.data.coco import CocoDataset
from talora.train.sampling import sample_task
from talora.data.tasks import TaskSet

from tests.unit.test_coco import FIXTURE


def _to_original(coords, size, target_length):
    """Inverse of ResizeLongestSide.apply_coords."""
    h, w = size
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(h, w, target_length)
    return coords[:, 0] * (w / new_w), coords[:, 1] * (h / new_h)


def test_points_hit_the_right_instance_after_resize():
    dataset = CocoDataset.load(str(FIXTURE))  # non-square images: 64x48 and 48x64
    tasks = TaskSet.from_dataset(dataset)
    rng = np.random.default_rng(0)
    checked = 0
    for image_id in dataset.image_ids:
        record, instances = dataset.images[image_id], dataset.instances[image_id]
        for task in tasks:
            for s in sample_task(record, instances, task, rng, ResizeLongestSide(1024), num_points=2, use_boxes=True):
                if s.kind == "semantic":
                    assert s.target.shape == (record.height, record.width)
                    continue
                assert s.point_coords.max() <= 1024
                x, y = _to_original(s.point_coords, (record.height, record.width), 1024)
                px, py = int(round(x[0])), int(round(y[0]))
                if s.kind == "positive":
                    assert s.target[py, px] and any(task.matches(i) and i.mask()[py, px] for i in instances)
                    assert s.box is not None and s.box[0] <= s.point_coords[0, 0] <= s.box[2]
                else:
                    assert not s.target.any() and not s.present
                    assert not any(task.matches(i) and i.mask()[py, px] for i in instances)
                    assert not any(i.iscrowd and i.mask()[py, px] for i in instances)  # crowd is never a negative
                checked += 1
    assert checked > 10


def test_semantic_target_is_the_union_and_empty_when_absent():
    dataset = CocoDataset.load(str(FIXTURE))
    tasks = TaskSet.from_dataset(dataset)
    rng = np.random.default_rng(0)
    vehicles = tasks.by_id["supercategory:vehicle"]
    semantic = sample_task(dataset.images[3], dataset.instances[3], vehicles, rng, ResizeLongestSide(256))[0]
    truck = next(i for i in dataset.instances[3] if i.category == "truck")
    assert semantic.present and np.array_equal(semantic.target, truck.mask())
    apples = tasks.by_id["category:apple"]
    absent = sample_task(dataset.images[1], dataset.instances[1], apples, rng, ResizeLongestSide(256))
    assert not absent[0].present and not absent[0].target.any()
    assert {s.kind for s in absent} <= {"semantic", "negative"}
    # A crowd region is never a positive: image 2's people are a crowd.
    people = sample_task(dataset.images[2], dataset.instances[2], tasks.by_id["category:person"], rng, ResizeLongestSide(256), num_points=3)
    assert [s.kind for s in people if s.kind == "positive"] == []
