import pytest

from talora.data.synthetic import make_split
from talora.data.coco import CocoDataset
from talora.data.tasks import NUM_HELDOUT_TEMPLATES, TEMPLATES, TaskSet, pluralize, task_ground_truth


@pytest.fixture(scope="module")
def demo():
    coco, _ = make_split(60, seed=3)
    return CocoDataset.from_dict(coco, "root")


def test_tasks_cover_categories_supercategories_attributes_and_pairs(demo):
    tasks = TaskSet.from_dataset(demo)
    kinds = {k: [t for t in tasks if t.kind == k] for k in ("category", "supercategory", "attribute", "composition")}
    assert len(kinds["category"]) == 9 and {t.id for t in kinds["supercategory"]} == {
        "supercategory:vehicle", "supercategory:fruit", "supercategory:shape"}
    assert {t.id for t in kinds["attribute"]} == {f"color:{c}" for c in ("red", "green", "blue", "yellow", "purple")}
    assert "color:red+category:car" in tasks.by_id
    red_cars = tasks.by_id["color:red+category:car"]
    assert all(red_cars.matches(i) == (i.category == "car" and i.attribute("color") == "red") for i in demo.all_instances())


def test_tasks_and_splits_are_deterministic(demo):
    a, b = TaskSet.from_dataset(demo), TaskSet.from_dataset(demo)
    assert [(t.id, t.heldout, t.train_prompts) for t in a] == [(t.id, t.heldout, t.train_prompts) for t in b]


def test_heldouts_are_disjoint_from_training(demo):
    tasks = TaskSet.from_dataset(demo)
    assert len(TEMPLATES) >= 12 + NUM_HELDOUT_TEMPLATES
    train_prompts = {p for t in tasks for p in t.train_prompts}
    heldout_prompts = {p for t in tasks for p in t.heldout_prompts}
    assert train_prompts and heldout_prompts and not train_prompts & heldout_prompts
    heldout = [t for t in tasks if t.heldout]
    assert heldout and all(t.kind == "composition" and not t.train_prompts for t in heldout)
    # One held-out pair per category; every colour and category is still trained on elsewhere.
    assert len(heldout) == 9 and len({t.predicate[0] for t in heldout}) == 5
    for t in heldout:
        for part in t.predicate:
            assert any(part in o.predicate for o in tasks if not o.heldout and o.kind == "composition")


def test_prompts_map_back_to_their_task(demo):
    tasks = TaskSet.from_dataset(demo)
    assert tasks.for_prompt("segment vehicles").id == "supercategory:vehicle"
    assert tasks.for_prompt("  Segment ALL red cars ").id == "color:red+category:car"
    assert tasks.for_prompt("highlight every red car").id == "color:red+category:car"  # singular template
    assert tasks.for_prompt("segment the moon") is None
    t = tasks.by_id["category:bus"]
    assert t.group_of("segment all buses") == "seen" and t.group_of("where are the buses?") == "heldout_paraphrase"


@pytest.mark.parametrize("word, plural", [("car", "cars"), ("bus", "buses"), ("person", "people"), ("fruit", "fruit"),
                                          ("traffic light", "traffic lights"), ("strawberry", "strawberries"), ("box", "boxes")])
def test_pluralize(word, plural):
    assert pluralize(word) == plural


def test_task_ground_truth_is_coco_with_tasks_as_categories(demo):
    from pycocotools.coco import COCO

    tasks = TaskSet.from_dataset(demo)
    gt = task_ground_truth(demo, tasks)
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    vehicle = next(c["id"] for c in gt["categories"] if c["name"] == "supercategory:vehicle")
    expected = sum(i.supercategory == "vehicle" for i in demo.all_instances())
    assert len(coco.getAnnIds(catIds=[vehicle])) == expected > 0
    ann = coco.anns[coco.getAnnIds(catIds=[vehicle])[0]]
    assert coco.annToMask(ann).sum() == ann["area"]
