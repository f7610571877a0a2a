import subprocess
import sys
import textwrap

import pytest

from talora.batch.commit import Manifest, RunOutput, ShardTracker, run_key
from talora.batch.parts import PARQUET

# A writer that processes shards a and b (two parts each) and can die between parts and manifest.
WRITER = textwrap.dedent("""
    import os, sys
    from talora.batch.commit import RunOutput, ShardTracker
    from talora.batch.parts import PARQUET
    out, die_in = sys.argv[1], sys.argv[2]
    run = RunOutput(out, "run1", None, PARQUET)
    todo = {s: [f"{s}/{i}.jpg" for i in range(4)] for s in ("a", "b") if s not in run.committed_shards()}
    tracker = ShardTracker(run, todo)
    for shard, items in todo.items():
        for k in range(2):
            batch = items[2 * k : 2 * k + 2]
            part = run.write_part(shard, k, [{"item": i, "value": v} for i, v in zip(batch, [1, 2])])
            if shard == die_in and k == 1:
                os._exit(9)  # killed after writing every part, before the manifest
            for item in batch:
                tracker.add(shard, item, rows=1, part=part, shard_items=4)
    print("committed", ",".join(sorted(tracker.committed)))
""")


def _write(out, die_in):
    return subprocess.run([sys.executable, "-c", WRITER, str(out), die_in], capture_output=True, text=True)


def test_a_run_killed_between_parts_and_manifest_reruns_to_exactly_one_copy(tmp_path):
    first = _write(tmp_path, die_in="b")
    assert first.returncode == 9
    run = RunOutput(str(tmp_path), "run1", None, PARQUET)
    assert run.committed_shards() == {"a"}
    assert len(list((tmp_path / "run1" / "b").glob("part-000001-*.parquet"))) == 1  # written, not committed...
    assert len(run.read_table()) == 4  # ...so readers see shard a only

    second = _write(tmp_path, die_in="none")
    assert second.returncode == 0 and second.stdout.split() == ["committed", "b"]  # a was skipped
    table = run.read_table()
    assert sorted(table["item"].to_pylist()) == sorted(f"{s}/{i}.jpg" for s in "ab" for i in range(4))


def test_stale_parts_are_never_read(tmp_path):
    run = RunOutput(str(tmp_path), run_key({"prompts": ["x"]}), None, PARQUET)
    part = run.write_part("s", 0, [{"v": 1}])
    run.write_part("s", 7, [{"v": 99}])  # left over from an earlier attempt
    run.commit(Manifest("s", [part], {"i": 1}, {}))
    assert run.read_table()["v"].to_pylist() == [1]


def test_a_repeated_item_is_recorded_once_with_its_last_result(tmp_path):
    run = RunOutput(str(tmp_path), "k", None, PARQUET)
    tracker = ShardTracker(run, ["s"])
    assert not tracker.has("s", "x")
    tracker.add("s", "x", 0, error="read timed out", shard_items=2)
    assert tracker.has("s", "x")
    tracker.add("s", "x", 2, "part-a", shard_items=2)  # the item again (a retried batch): not a third item
    assert tracker.add("s", "y", 1, "part-a", shard_items=2)
    manifest = run.manifests()["s"]
    assert manifest.items == {"x": 2, "y": 1} and manifest.errors == {}
    assert tracker.items_committed == 2 and tracker.has("s", "x")


def test_two_attempts_on_one_output_never_share_a_part_and_the_last_manifest_wins_whole(tmp_path):
    first, second = (RunOutput(str(tmp_path), "k", None, PARQUET) for _ in range(2))
    assert first.attempt != second.attempt
    # The same shard, batched differently by each attempt (part 0 holds other items in each), every
    # part of both written before either commits, as two drivers started together do.
    manifests = {}
    for run, batches in ((first, [["a", "b"], ["c"]]), (second, [["a"], ["b", "c"]])):
        parts, k = [], 0
        for batch in batches:
            parts.append(run.write_part("s", k, [{"item": i} for i in batch]))
            k += len(batch)
        manifests[run.attempt] = Manifest("s", parts, {"a": 1, "b": 1, "c": 1}, {})
    assert len(list((tmp_path / "k" / "s").iterdir())) == 4  # none overwritten
    for run in (first, second):
        run.commit(manifests[run.attempt])
        assert sorted(RunOutput(str(tmp_path), "k", None, PARQUET).read_table()["item"].to_pylist()) == ["a", "b", "c"]
    assert all(second.attempt in part for part in first.manifests()["s"].parts)  # the last one, whole


def test_manifest_lists_every_item_with_its_rows_zero_and_errors_included(tmp_path):
    run = RunOutput(str(tmp_path), "k", None, PARQUET)
    tracker = ShardTracker(run, ["s", "t"])
    assert not tracker.add("s", "x", 3, "part-000000.parquet", shard_items=3)
    assert not tracker.add("s", "y", 0, shard_items=3)
    assert run.committed_shards() == set()  # two of three: not committed yet
    assert tracker.add("s", "z", 0, error="cannot decode image", shard_items=3)
    manifest = run.manifests()["s"]
    assert manifest.items == {"x": 3, "y": 0, "z": 0}
    assert manifest.errors == {"z": "cannot decode image"} and manifest.parts == ["part-000000.parquet"]
    assert not tracker.add("s", "z", 0, shard_items=3)  # a retried batch's late copy changes nothing
    assert tracker.open == {} and tracker.pending() == ["t"]  # a committed shard's state is dropped
    with pytest.raises(KeyError, match="shard w"):
        tracker.add("w", "w/1.jpg", 1, shard_items=1)
    tracker = ShardTracker(run, ["u"])
    tracker.add("u", "u/1.jpg", 1, shard_items=2)
    with pytest.raises(RuntimeError, match="2 items, but was listed with 1"):  # listings that disagree
        tracker.add("u", "u/2.jpg", 1, shard_items=1)


def test_committed_shards_come_from_manifest_names_without_reading_one(tmp_path):
    run = RunOutput(str(tmp_path), "k", None, PARQUET)
    run.commit(Manifest("shard-7", [], {"i": 0}, {}))
    (tmp_path / "k" / "_manifests" / "_shard-8.json.tmp-1").write_text("{")  # an in-progress write
    (tmp_path / "k" / "_manifests" / "shard-7.json").write_text("not json")  # never read here
    assert run.committed_shards() == {"shard-7"}


def test_run_key_changes_with_any_input_and_not_with_key_order():
    assert run_key({"a": 1, "b": [1, 2]}) == run_key({"b": [1, 2], "a": 1})
    assert run_key({"a": 1}) != run_key({"a": 2})


def test_commit_protocol_on_s3(s3):
    run = RunOutput("s3://talora-test/out", "k", s3, PARQUET)
    tracker = ShardTracker(run, ["s"])
    tracker.add("s", "x", 1, run.write_part("s", 0, [{"v": 5}]), shard_items=1)
    assert RunOutput("s3://talora-test/out", "k", s3, PARQUET).read_table()["v"].to_pylist() == [5]


class JsonLinesParts:
    """A second part format: what adding an output format beside Parquet takes."""

    name = "jsonl"
    suffix = ".jsonl"

    def encode(self, rows, schema):
        import json

        return "".join(json.dumps(r) + "\n" for r in rows).encode()

    def decode(self, data):
        import json

        import pyarrow as pa

        return pa.Table.from_pylist([json.loads(line) for line in data.decode().splitlines()])


def test_another_part_format_goes_through_the_same_commit_protocol(tmp_path):
    run = RunOutput(str(tmp_path), "k", None, JsonLinesParts())
    tracker = ShardTracker(run, ["s"])
    part = run.write_part("s", 0, [{"image": "x", "v": 1}, {"image": "y", "v": 2}])
    assert part == f"part-000000-{run.attempt}.jsonl" and (tmp_path / "k" / "s" / part).read_text().count("\n") == 2
    assert run.read_table() is None  # written, not yet committed: nothing is visible
    tracker.add("s", "x", 1, part, shard_items=2)
    assert tracker.add("s", "y", 1, part, shard_items=2)
    assert run.read_table().to_pylist() == [{"image": "x", "v": 1}, {"image": "y", "v": 2}]


def test_the_part_format_is_chosen_by_name_and_is_part_of_the_labelling_run_key(tmp_path, monkeypatch):
    from talora.batch.parts import PART_FORMATS, part_format
    from talora.label.job import LabelConfig, run_identity

    jsonl = JsonLinesParts()
    monkeypatch.setitem(PART_FORMATS, jsonl.name, jsonl)
    assert part_format("parquet") is PARQUET and part_format("jsonl") is jsonl
    with pytest.raises(ValueError, match="--part-format must be one of"):
        LabelConfig(prompts=("x",), images=str(tmp_path), output=str(tmp_path / "out"), part_format="csv")
    keys = {name: run_key(run_identity(LabelConfig(prompts=("x",), images=str(tmp_path), output=str(tmp_path / "o"),
                                                   part_format=name), ["x"], "m"))
            for name in ("parquet", "jsonl")}
    assert keys["parquet"] != keys["jsonl"]
