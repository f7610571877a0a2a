import numpy as np

from talora.data.coco import CocoDataset
from talora.eval.metrics import TaskIoU, reference_scores
from talora.data.tasks import TaskSet


def test_task_iou_sums_intersections_and_unions_over_images():
    iou = TaskIoU()
    gt1 = np.zeros((4, 4), bool); gt1[:2] = True  # 8 px
    pred1 = np.zeros((4, 4), bool); pred1[:1] = True  # 4 px, all inside
    gt2 = np.zeros((4, 4), bool)  # task absent here
    pred2 = np.zeros((4, 4), bool); pred2[3, :2] = True  # 2 false-positive px count in the union
    iou.add("t", pred1, gt1)
    iou.add("t", pred2, gt2)
    assert iou.per_key() == {"t": 4 / (8 + 2)}  # not the mean of per-image IoUs (0.5 and 0)
    iou.add("never", np.zeros((2, 2), bool), np.zeros((2, 2), bool))
    assert "never" not in iou.per_key()  # empty everywhere: no IoU


def test_references_expose_a_prompt_that_reads_only_one_word():
    from talora.data.synthetic import make_split

    coco, _ = make_split(30, seed=4)
    dataset = CocoDataset.from_dict(coco, "root")
    tasks = TaskSet.from_dataset(dataset)
    refs = reference_scores(dataset, tasks)
    comp = refs["heldout_composition"]
    # On colour x category tasks neither single-word reference is perfect, and "every object" is worse still.
    assert 0 < comp["every_object"] < comp["attribute_only"] < 1
    assert 0 < comp["category_only"] < 1
    assert refs["seen"]["category_only"] is not None and refs["seen"]["every_object"] < 1
