"""Reading a detector's boxes: COCO results JSON or Parquet; a bad entry names the file, entry and field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from talora.label.boxes import read_boxes

PROMPTS = ["segment vehicles", "segment fruit"]


def test_coco_results_and_parquet_boxes_index_by_id_and_by_uri(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps([
        {"image_id": 3, "bbox": [1, 2, 30, 40], "score": 0.9, "category_id": 1},
        {"image_id": 3, "bbox": [5, 5, 10, 10]}]))
    index = read_boxes(str(tmp_path / "results.json"), PROMPTS)
    assert index.total == 2 and index.of("any/uri.jpg", 3) == [{"bbox": [1.0, 2.0, 30.0, 40.0], "prompt": None},
                                                               {"bbox": [5.0, 5.0, 10.0, 10.0], "prompt": None}]
    (tmp_path / "dataset.json").write_text(json.dumps({"images": [], "annotations": [{"image_id": 4, "bbox": [0, 0, 2, 2]}]}))
    assert read_boxes(str(tmp_path / "dataset.json"), PROMPTS).of("x", 4)[0]["bbox"] == [0.0, 0.0, 2.0, 2.0]
    pq.write_table(pa.Table.from_pylist([{"image_uri": "s3://b/a.jpg", "bbox": [1.0, 1.0, 4.0, 4.0], "prompt": "segment fruit"},
                                         {"image_uri": "s3://b/a.jpg", "bbox": [2.0, 2.0, 4.0, 4.0], "prompt": None}]),
                   tmp_path / "boxes.parquet")
    index = read_boxes(str(tmp_path / "boxes.parquet"), PROMPTS)
    assert [b["prompt"] for b in index.of("s3://b/a.jpg", 0)] == ["segment fruit", None]
    assert index.unmatched({"s3://b/other.jpg"}, set()) == ["s3://b/a.jpg"]


@pytest.mark.parametrize("entry, message", [
    ({"image_id": 1, "bbox": [1, 2, 3]}, "entry 0: bbox must be 4 numbers"),
    ({"image_id": 1, "bbox": [1, 2, 0, 3]}, "entry 0: bbox .* has no area"),
    ({"image_id": 1, "bbox": [1, 2, 3, 4], "prompt": "segment dogs"}, "'segment dogs' is not one of the job's prompts"),
    ({"bbox": [1, 2, 3, 4]}, "entry 0: needs image_uri or image_id"),
])
def test_a_bad_box_is_an_error_naming_the_file_entry_and_field(tmp_path, entry, message):
    (tmp_path / "boxes.json").write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match=message):
        read_boxes(str(tmp_path / "boxes.json"), PROMPTS)
