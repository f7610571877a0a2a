"""Planning a bucket by shard: the driver lists shard folders only; tasks list the images."""

import pytest

from talora.batch.shards import ShardPlan, image_id_for_uri, list_images, plan_shards, shard_items
from talora.io.storage import write_bytes


def _touch(root, *names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


BUCKET = ("b/2.jpg", "b/1.PNG", "a/x/deep.jpg", "a/notes.txt", "3.jpg", "1.jpg", "2.jpeg", "_tmp/9.jpg",
          ".hidden.jpg", "c/_part.jpg", "empty/readme.txt")


def test_sub_folders_are_shards_listed_later_and_flat_files_are_cut_into_virtual_shards(tmp_path):
    _touch(tmp_path, *BUCKET)
    plans = plan_shards(str(tmp_path), shard_size=2)
    assert [p.name for p in plans] == ["virtual-00000", "virtual-00001", "a", "b", "c", "empty"]
    assert plans[0].uris == (str(tmp_path / "1.jpg"), str(tmp_path / "2.jpeg"))  # sorted keys, listed here
    assert plans[1].uris == (str(tmp_path / "3.jpg"),)
    assert plans[2] == ShardPlan("a", str(tmp_path / "a"))  # a folder: its images are not listed by the planner
    assert plan_shards(str(tmp_path), shard_size=2) == plans  # stable
    assert list_images(plans[3].folder) == (str(tmp_path / "b/1.PNG"), str(tmp_path / "b/2.jpg"))
    assert list_images(plans[2].folder) == (str(tmp_path / "a/x/deep.jpg"),)  # every image below the folder
    assert list_images(plans[4].folder) == list_images(plans[5].folder) == ()


def test_the_planner_never_lists_below_the_prefix(tmp_path, monkeypatch):
    import fsspec.implementations.local as local

    _touch(tmp_path, *BUCKET)
    listed = []
    real_ls, real_find = local.LocalFileSystem.ls, local.LocalFileSystem.find
    monkeypatch.setattr(local.LocalFileSystem, "ls", lambda self, path, *a, **k: listed.append(path) or real_ls(self, path, *a, **k))
    monkeypatch.setattr(local.LocalFileSystem, "find", lambda self, path, *a, **k: listed.append(path) or real_find(self, path, *a, **k))
    plan_shards(str(tmp_path), shard_size=2)
    assert listed == [str(tmp_path)]
    plan_shards(str(tmp_path), shard_size=2, max_shards=3)
    assert listed == [str(tmp_path)] * 2


def test_max_shards_and_max_images_stop_listing_early(tmp_path, monkeypatch):
    import talora.batch.shards

    for shard in range(5):
        _touch(tmp_path, *(f"s{shard}/{i}.jpg" for i in range(3)))
    assert [p.name for p in plan_shards(str(tmp_path), max_shards=2)] == ["s0", "s1"]
    listed = []
    real = talora.batch.shards.list_images
    monkeypatch.setattr(talora.batch.shards, "list_images", lambda folder, *a: listed.append(folder) or real(folder, *a))
    plans = plan_shards(str(tmp_path), max_images=4)
    assert [(p.name, len(p.uris)) for p in plans] == [("s0", 3), ("s1", 1)]  # the last shard cut
    assert listed == [str(tmp_path / "s0"), str(tmp_path / "s1")]  # s2.. never listed


def test_shard_items_number_a_shard_and_stamp_its_size(tmp_path):
    _touch(tmp_path, "s/b.jpg", "s/a.jpg")
    a, b = str(tmp_path / "s/a.jpg"), str(tmp_path / "s/b.jpg")
    items = shard_items({"shard": "s", "folder": str(tmp_path / "s"), "uris": []}, image_ids={b: 0})
    assert items == [{"uri": a, "image_id": image_id_for_uri(a), "shard": "s", "index": 0, "shard_items": 2},
                     {"uri": b, "image_id": 0, "shard": "s", "index": 1, "shard_items": 2}]  # COCO id 0 kept
    listed = shard_items({"shard": "v", "folder": "", "uris": [b]})  # already listed: no listing
    assert [(i["uri"], i["index"], i["shard_items"]) for i in listed] == [(b, 0, 1)]


def test_shards_on_s3_keep_the_scheme(s3):
    for key in ("s1/a.jpg", "s1/b.jpg", "s2/c.jpg", "top.jpg"):
        write_bytes(f"s3://talora-test/imgs/{key}", b"x", s3)
    plans = plan_shards("s3://talora-test/imgs", options=s3)
    assert plans == [ShardPlan("virtual-00000", "", ("s3://talora-test/imgs/top.jpg",)),
                     ShardPlan("s1", "s3://talora-test/imgs/s1"), ShardPlan("s2", "s3://talora-test/imgs/s2")]
    assert list_images(plans[1].folder, s3) == ("s3://talora-test/imgs/s1/a.jpg", "s3://talora-test/imgs/s1/b.jpg")


def test_a_missing_prefix_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        plan_shards(str(tmp_path / "nothing-here"))


def test_the_embedding_job_plans_a_prefix_by_shard_and_a_coco_json_as_its_list(tmp_path):
    from pathlib import Path

    from talora.train.embed import EmbedConfig, plan

    _touch(tmp_path, *(f"s{s}/{i}.jpg" for s in range(3) for i in range(2)))
    plans, ids = plan(EmbedConfig(output=str(tmp_path / "out"), images=str(tmp_path)))
    assert [(p.name, p.uris) for p in plans] == [("s0", ()), ("s1", ()), ("s2", ())] and ids is None
    plans, _ = plan(EmbedConfig(output=str(tmp_path / "out"), images=str(tmp_path), max_images=3))
    assert [(p.name, len(p.uris)) for p in plans] == [("s0", 2), ("s1", 1)]
    coco = str(Path(__file__).resolve().parents[1] / "fixtures" / "coco3" / "instances.json")
    plans, ids = plan(EmbedConfig(output=str(tmp_path / "out"), annotations=coco, shard_size=2))
    assert [(p.name, len(p.uris)) for p in plans] == [("virtual-00000", 2), ("virtual-00001", 1)]
    assert sorted(ids.values()) == [1, 2, 3] and set(ids) == {u for p in plans for u in p.uris}


def test_coco_ids_map_to_a_relative_local_prefix_as_the_listing_names_its_images(tmp_path, monkeypatch):
    from talora.data.synthetic import write_demo_dataset
    from talora.label.job import LabelConfig, plan

    monkeypatch.chdir(tmp_path)
    write_demo_dataset("d", num_train=0, num_val=3, seed=0, shard_size=2)
    plans, ids = plan(LabelConfig(prompts=("segment vehicles",), images="d/val/images",
                                  annotations="d/val/instances.json", output="out"))
    items = [i for p in plans for i in shard_items({"shard": p.name, "folder": p.folder, "uris": list(p.uris)},
                                                   image_ids=ids)]
    assert sorted(i["image_id"] for i in items) == [1, 2, 3]  # the COCO ids, not hashes of the paths
