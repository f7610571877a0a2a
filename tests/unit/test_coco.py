import copy
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from talora.data.coco import CocoDataset
from talora.io.images import decode_image

FIXTURE = Path(__file__).parent.parent / "fixtures" / "coco3" / "instances.json"


@pytest.fixture
def raw():
    return json.loads(FIXTURE.read_text())


def test_polygons_and_both_rle_kinds_give_pycocotools_own_masks():
    dataset = CocoDataset.load(str(FIXTURE))
    reference = COCO(str(FIXTURE))
    kinds = set()
    for inst in dataset.all_instances():
        ann = reference.anns[inst.id]
        kinds.add("polygon" if isinstance(ann["segmentation"], list)
                  else "uncompressed" if isinstance(ann["segmentation"]["counts"], list) else "compressed")
        np.testing.assert_array_equal(inst.mask(), reference.annToMask(ann).astype(bool))
        image = dataset.images[inst.image_id]
        assert inst.mask().shape == (image.height, image.width)  # RLE size is [height, width]
    assert kinds == {"polygon", "uncompressed", "compressed"}


def test_area_is_taken_from_the_mask_when_missing_or_inconsistent():
    dataset = CocoDataset.load(str(FIXTURE))
    by_id = {i.id: i for i in dataset.all_instances()}
    assert by_id[301].area == by_id[301].mask().sum()  # truck: no area in the file
    assert by_id[302].area == by_id[302].mask().sum() != 5.0  # apple: area 5 is wrong
    assert by_id[101].area == 312.0  # consistent areas are kept as given
    assert any("annotation 302" in w for w in dataset.warnings)


def test_iscrowd_is_kept_and_metadata_is_real_coco():
    dataset = CocoDataset.load(str(FIXTURE))
    crowd = [i for i in dataset.all_instances() if i.iscrowd]
    assert [i.id for i in crowd] == [202]
    assert {i.supercategory for i in dataset.all_instances() if i.category == "bus"} == {"vehicle"}
    assert dataset.images[1].uri.endswith("coco3/images/000000000001.jpg")
    assert dataset.load_image(2).shape == (64, 48, 3)


def test_malformed_annotations_are_dropped_with_warnings_naming_them(raw):
    bad = copy.deepcopy(raw)
    bad["annotations"] += [
        {"id": 900, "image_id": 99, "category_id": 3, "segmentation": [[0, 0, 5, 0, 5, 5]]},  # unknown image
        {"id": 901, "image_id": 1, "category_id": 3, "segmentation": [[0, 0, 5, 5]]},  # 2-point polygon
        {"id": 902, "image_id": 1, "category_id": 3},  # no segmentation
        {"id": 903, "image_id": 1, "category_id": 3, "segmentation": {"size": [10, 10], "counts": [100]}},  # wrong size
        {"id": 904, "image_id": 1, "category_id": 777, "segmentation": [[0, 0, 5, 0, 5, 5]]},  # unknown category
    ]
    dataset = CocoDataset.from_dict(bad, "root", "bad.json")
    assert len(dataset.all_instances()) == len(raw["annotations"])  # the good ones still load
    for ann_id in (900, 901, 902, 903, 904):
        assert any(f"annotation {ann_id}" in w for w in dataset.warnings), ann_id


def test_a_file_without_coco_keys_is_an_error_naming_it(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"broken\.json.*missing key\(s\) \['annotations', 'categories'\]"):
        CocoDataset.load(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        CocoDataset.load(str(path))


def test_decode_image_handles_grey_rgba_16_bit_and_exif(tmp_path):
    import io

    from PIL import Image

    def encoded(image, **kw):
        buffer = io.BytesIO()
        image.save(buffer, format=kw.pop("format", "PNG"), **kw)
        return buffer.getvalue()

    assert decode_image(encoded(Image.new("L", (5, 3), 7))).shape == (3, 5, 3)
    assert decode_image(encoded(Image.new("RGBA", (5, 3), (1, 2, 3, 4))))[0, 0].tolist() == [1, 2, 3]
    sixteen = Image.fromarray(np.full((3, 5), 65535, dtype=np.uint16))
    assert decode_image(encoded(sixteen))[0, 0].tolist() == [255, 255, 255]  # scaled, not clipped to 255 of 65535
    half = Image.fromarray(np.full((3, 5), 32768, dtype=np.uint16))
    assert decode_image(encoded(half))[0, 0, 0] == 128
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: a 5x3 stored image is 3 wide, 5 high when shown
    assert decode_image(encoded(Image.new("RGB", (5, 3)), format="JPEG", exif=exif)).shape == (5, 3, 3)


def test_a_16_bit_gradient_stays_a_gradient_and_cmyk_becomes_rgb():
    import io

    from PIL import Image

    gradient = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (4, 1))
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="PNG")
    row = decode_image(buffer.getvalue())[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) >= 0) and len(set(row.tolist())) > 50
    dark = Image.fromarray(np.full((2, 3), 200, dtype=np.uint16))  # 200 of 65535: nearly black
    buffer = io.BytesIO()
    dark.save(buffer, format="PNG")
    assert decode_image(buffer.getvalue())[0, 0, 0] == 1
    buffer = io.BytesIO()
    Image.new("CMYK", (4, 3), (0, 255, 255, 0)).save(buffer, format="JPEG")
    red = decode_image(buffer.getvalue())[1, 1]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_images_over_the_pixel_limit_and_empty_files_are_refused():
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (200, 100)).save(buffer, format="PNG")
    with pytest.raises(ValueError, match="200x100 = 20000 pixels exceeds the limit of 10000"):
        decode_image(buffer.getvalue(), max_pixels=10000)
    with pytest.raises(ValueError, match="empty file"):
        decode_image(b"")
