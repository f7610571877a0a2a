import json

from pycocotools.coco import COCO

from talora.data.synthetic import COLORS, make_split, write_demo_dataset


def test_generator_is_deterministic_per_seed():
    a, files_a = make_split(12, seed=7)
    b, files_b = make_split(12, seed=7)
    c, _ = make_split(12, seed=8)
    assert a == b and files_a == files_b
    assert a["annotations"] != c["annotations"]


def test_output_is_valid_coco_with_no_empty_masks_and_colour_attributes(tmp_path):
    written = write_demo_dataset(str(tmp_path / "demo"), num_train=20, num_val=5, seed=1)
    coco = COCO(written["train"])
    assert len(coco.imgs) == 20 and len(coco.anns) > 20
    sizes, colours = [], set()
    for ann in coco.anns.values():
        mask = coco.annToMask(ann)
        assert mask.shape == (256, 256) and mask.sum() == ann["area"] > 0
        x, y, w, h = ann["bbox"]
        sizes.append(max(w, h))
        colours.add(ann["attributes"]["color"])
    assert colours == set(COLORS)
    assert min(sizes) >= 10 and max(sizes) > 64  # several sizes, large ones span many 16-px cells
    for image in coco.imgs.values():
        assert (tmp_path / "demo" / "train" / "images" / image["file_name"]).stat().st_size > 0
    assert json.loads((tmp_path / "demo" / "val" / "instances.json").read_text())["images"][0]["id"] == 1


def test_occlusion_is_reflected_in_the_masks():
    coco, _ = make_split(40, seed=2)
    c = COCO()
    c.dataset = coco
    c.createIndex()
    overlapping_boxes = 0
    for image_id in c.imgs:
        anns = c.imgToAnns[image_id]
        masks = [c.annToMask(a).astype(bool) for a in anns]
        for i in range(len(anns)):
            for j in range(i + 1, len(anns)):
                assert not (masks[i] & masks[j]).any()  # what is hidden belongs to the object on top only
                (x1, y1, w1, h1), (x2, y2, w2, h2) = anns[i]["bbox"], anns[j]["bbox"]
                overlapping_boxes += x1 < x2 + w2 and x2 < x1 + w1 and y1 < y2 + h2 and y2 < y1 + h1
    assert overlapping_boxes > 10  # objects do overlap, so the disjointness above is occlusion at work


def test_shard_sub_folders(tmp_path):
    write_demo_dataset(str(tmp_path), num_train=5, num_val=1, seed=0, shard_size=2)
    names = sorted(p.name for p in (tmp_path / "train" / "images").iterdir())
    assert names == ["shard-00000", "shard-00001", "shard-00002"]


def test_the_other_domain_has_none_of_the_demo_colours_its_own_backgrounds_and_sizes():
    import pytest

    from talora.data.synthetic import PALETTES, SyntheticConfig

    config = SyntheticConfig(palette="other", background="checker", min_size=32, max_size=64)
    coco, _ = make_split(30, seed=4, config=config)
    colours = {a["attributes"]["color"] for a in coco["annotations"]}
    assert colours <= set(PALETTES["other"]) and len(colours) >= 4 and not colours & set(COLORS)
    assert max(max(a["bbox"][2:]) for a in coco["annotations"]) <= 64 + 2  # the outline adds a pixel per side
    assert make_split(30, seed=4)[0]["annotations"] != coco["annotations"]
    with pytest.raises(ValueError, match="palette must be one of"):
        SyntheticConfig(palette="sepia")


def test_a_demo_dataset_a_command_points_at_is_generated_once_and_said_so(tmp_path, monkeypatch):
    import os

    from talora.data import synthetic

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(synthetic.DEMO_DATASETS, "data/tiny-demo", {"num_train": 2, "num_val": 1, "seed": 0})
    said = []
    assert synthetic.ensure_demo_dataset("data/tiny-demo/train/instances.json", said.append)
    assert os.path.exists("data/tiny-demo/val/instances.json") and "generating the demo dataset data/tiny-demo/" in said[0]
    assert not synthetic.ensure_demo_dataset("./data/tiny-demo/val/instances.json", said.append) and len(said) == 1
    assert not synthetic.ensure_demo_dataset("data/mine/train/instances.json", said.append)  # not a demo dataset
    assert not os.path.exists("data/mine") and synthetic.DEMO_DATASETS["data/demo-models"]["num_train"] == 3000
