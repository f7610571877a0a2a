import numpy as np
import pytest
import torch

from talora.cli.main import main
from talora.data.coco import CocoDataset
from talora.model.loading import load_backbone
from talora.eval.probe import cell_labels, linear_probe

from tests.unit.test_coco import FIXTURE


def test_probe_separates_linearly_separable_cells_and_is_at_chance_on_shuffled_labels():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, size=(4, 16))
    y = rng.integers(0, 4, 800)
    x = centers[y] + rng.normal(0, 1, size=(800, 16))
    labels = [f"c{i}" for i in y]
    good = linear_probe(x[:600], labels[:600], x[600:], labels[600:])
    assert good.accuracy > 0.95 and good.classes == 4
    shuffled = list(rng.permutation(labels[:600]))
    bad = linear_probe(x[:600], shuffled, x[600:], labels[600:])
    assert bad.accuracy < 0.45  # ~chance (0.25 with 4 balanced classes)


def test_cells_inside_an_object_get_its_label_in_the_resized_frame():
    dataset = CocoDataset.load(str(FIXTURE))
    # image 2 (48 wide x 64 high): a bus over rows 8-29, columns 4-43; resized to 48x64 -> input 192x256
    cells = cell_labels(dataset.instances[2], (256, 192), load_backbone("vit_tiny"), (16, 16), "supercategory")
    labels = set(cells.values())
    assert labels == {"vehicle"}  # the crowd of people is never a probe label
    rows = {c // 16 for c in cells}
    cols = {c % 16 for c in cells}
    assert min(rows) >= 8 * 4 // 16 and max(rows) <= 30 * 4 // 16  # bus rows 8..29 x4 scale / 16-px cells
    assert max(cols) < 12  # columns past the 192-px resized width are padding


@pytest.mark.parametrize("sam_type", ["vit_tiny", "sam2_tiny"])  # sam2: the packed trunk's S/32 grid
def test_probe_command_reports_each_key_with_its_chance_level(tmp_path, capsys, sam_type):
    from talora.data.synthetic import write_demo_dataset

    written = write_demo_dataset(str(tmp_path / "demo"), num_train=8, num_val=4, seed=1)
    torch.manual_seed(0)
    assert main(["probe", "--annotations", written["train"], "--val-annotations", written["val"], "--json",
                 "--sam-type", sam_type]) == 0
    import json

    results = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(results) == {"category", "supercategory", "color"}
    assert all(0 <= r["accuracy"] <= 1 and 0 < r["chance"] <= 1 and r["test_cells"] > 0 for r in results.values())


def test_probe_is_fitted_on_the_first_train_images_and_scored_on_the_first_test_images(tmp_path):
    from talora.data.synthetic import write_demo_dataset
    from talora.eval.probe import collect, probe_base

    written = write_demo_dataset(str(tmp_path / "demo"), num_train=6, num_val=5, seed=2)
    train, test = CocoDataset.load(written["train"]), CocoDataset.load(written["val"])
    torch.manual_seed(0)
    sam = load_backbone("vit_tiny")
    (result,) = probe_base(sam, train, test, 1, keys=("category",), train_images=4, test_images=2)
    fitted = collect(sam, train, train.image_ids[:4], 1, ("category",))["category"][1]
    scored = collect(sam, test, test.image_ids[:2], 1, ("category",))["category"][1]
    assert result.train_cells == len(fitted) < len(collect(sam, train, train.image_ids, 1, ("category",))["category"][1])
    assert result.test_cells == sum(label in set(fitted) for label in scored)  # unseen classes cannot be scored
