"""The actor layout a job chooses from the resources Ray reports, and its progress line and status file."""

import re
import shlex
from pathlib import Path

import pytest

from talora.batch.pipeline import ActorLayout
from talora.cli.common import add_layout_flags, layout_from_args

DOCS = Path(__file__).resolve().parents[2] / "docs" / "labelling.md"


def test_a_two_core_machine_gets_one_single_thread_actor_per_core_and_room_for_decoding():
    layout = ActorLayout().resolve({"CPU": 2.0})
    assert layout == ActorLayout(num_actors=2, cpus_per_actor=0.75, gpus_per_actor=0.0, threads_per_actor=1)
    assert 2.0 - layout.num_actors * layout.cpus_per_actor >= 0.5  # two read/decode tasks still fit


def test_real_sams_on_cpus_get_four_threads_per_actor():
    assert ActorLayout().resolve({"CPU": 16.0}, light_model=False) == ActorLayout(4, 3.0, 0.0, 4)


def test_gpus_get_one_actor_per_gpu_share():
    assert ActorLayout().resolve({"CPU": 16.0, "GPU": 2.0}) == ActorLayout(2, 1.5, 1.0, 2)
    assert ActorLayout(gpus_per_actor=0.5).resolve({"CPU": 16.0, "GPU": 1.0}) == ActorLayout(2, 1.5, 0.5, 2)
    assert ActorLayout(gpus_per_actor=0).resolve({"CPU": 2.0, "GPU": 1.0}).gpus_per_actor == 0.0  # CPU only


def test_gpu_shares_are_counted_per_node_and_each_node_keeps_cpus_for_decoding():
    t4s = [{"CPU": 0.0}] + [{"CPU": 4.0, "GPU": 1.0}] * 16  # a CPU-0 head and 16 g4dn.xlarge
    total = {"CPU": 64.0, "GPU": 16.0}
    assert ActorLayout().resolve(total, nodes=t4s) == ActorLayout(16, 1.5, 1.0, 2)
    assert ActorLayout(gpus_per_actor=0.25).resolve(total, nodes=t4s) == ActorLayout(64, 0.75, 0.25, 2)
    # three actors fit on each GPU at 0.3, not ten on three GPUs
    assert ActorLayout(gpus_per_actor=0.3).resolve({"CPU": 12.0, "GPU": 3.0}, nodes=[{"CPU": 4.0, "GPU": 1.0}] * 3) \
        .num_actors == 9
    # a big CPU head beside an 8-GPU node with 8 cores: the actors ask for what that node has
    lean = ActorLayout().resolve({"CPU": 72.0, "GPU": 8.0}, nodes=[{"CPU": 64.0}, {"CPU": 8.0, "GPU": 8.0}])
    assert lean == ActorLayout(8, 0.75, 1.0, 2) and lean.num_actors * lean.cpus_per_actor <= 0.75 * 8


def test_a_gpu_share_no_node_has_is_refused_and_an_autoscaling_cluster_keeps_the_flags():
    with pytest.raises(ValueError, match="--gpus-per-actor 2 fits no node of this cluster: the largest has 1 GPU"):
        ActorLayout(gpus_per_actor=2).resolve({"CPU": 8.0, "GPU": 2.0}, nodes=[{"CPU": 4.0, "GPU": 1.0}] * 2)
    # no GPU node is up yet (the autoscaler starts them on demand): the flags are the layout, and two
    # actors of 1.5 CPU leave a 4-core T4 node a core for decoding
    assert ActorLayout(num_actors=32, gpus_per_actor=0.5).resolve({"CPU": 0.0}, nodes=[{"CPU": 0.0}]) == \
        ActorLayout(32, 1.5, 0.5, 2)


def _gpu_layout_rows():
    text = DOCS.read_text().split("<!-- gpu-layouts -->")[1].split("<!-- /gpu-layouts -->")[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.strip().splitlines()[2:]]


def _nodes(spec: str) -> list[dict]:
    """ "0/0 + 16 × 4/1" -> a 0-CPU node and sixteen nodes of 4 CPUs and 1 GPU."""
    nodes = []
    for term in spec.split(" + "):
        count, cpus, gpus = re.fullmatch(r"(?:(\d+) × )?(\d+)/(\d+)", term).groups()
        node = {"CPU": float(cpus), **({"GPU": float(gpus)} if int(gpus) else {})}
        nodes += [node] * int(count or 1)
    return nodes


@pytest.mark.parametrize("row", _gpu_layout_rows(), ids=lambda row: row[0])
def test_each_layout_of_the_multi_gpu_recipe_is_what_the_job_prints(row):
    import argparse

    _, spec, flags, printed = row
    parser = argparse.ArgumentParser()
    add_layout_flags(parser)
    layout = layout_from_args(parser.parse_args(shlex.split(flags.strip("`"))))
    nodes = _nodes(spec)
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    assert layout.resolve(total, nodes=nodes).describe() == printed.strip("`")


def test_given_fields_are_kept_and_the_rest_fit_around_them():
    assert ActorLayout(num_actors=1).resolve({"CPU": 2.0}) == ActorLayout(1, 1.5, 0.0, 2)
    assert ActorLayout(num_actors=3, cpus_per_actor=0.2, threads_per_actor=1).resolve({"CPU": 2.0}) == \
        ActorLayout(3, 0.2, 0.0, 1)


@pytest.mark.parametrize("field, value, message", [("num_actors", 0, "--num-actors must be >= 1"),
                                                   ("cpus_per_actor", 0.0, "--cpus-per-actor must be > 0"),
                                                   ("gpus_per_actor", -1.0, "--gpus-per-actor must be >= 0"),
                                                   ("threads_per_actor", 0, "--threads-per-actor must be >= 1")])
def test_a_bad_layout_is_refused_naming_the_flag(field, value, message):
    with pytest.raises(ValueError, match=message):
        ActorLayout(**{field: value})


def test_the_status_file_counts_shards_and_estimates_images_and_eta_from_the_shards_done(tmp_path):
    import json

    from talora.batch.commit import RunOutput, ShardTracker
    from talora.batch.pipeline import progress, status
    from talora.batch.parts import PARQUET

    run = RunOutput(str(tmp_path), "k", None, PARQUET)
    tracker = ShardTracker(run, ["a", "b", "c", "d"])
    assert progress(status("running", tracker, 0, 1, 0, 1.0)).endswith("1/? images, 1.0 images/s, ETA ?")
    for shard in "ab":
        for i in range(2):
            tracker.add(shard, f"{shard}/{i}.jpg", 0, shard_items=2)
    tracker.add("c", "c/0.jpg", 0, error="empty file", shard_items=2)
    run.write_status(status("running", tracker, 3, 5, 1, 5.0))
    written = json.loads((tmp_path / "k" / "_status.json").read_text())
    assert written["state"] == "running" and written["shards"] == {"committed": 2, "to_do": 4, "skipped": 3}
    # 2 images per committed shard x 4 shards = ~8 images, 3 to come at 1 image/s
    assert written["images"] == {"returned": 5, "errors": 1, "per_shard": 2.0, "estimated_total": 8}
    assert written["images_per_second"] == 1.0 and written["shards_per_second"] == 0.4 and written["eta_s"] == 3.0
    assert written["updated"].endswith("+00:00")
    assert progress(written) == "2/4 shards, 5/~8 images, 1.0 images/s, ETA 0:03"
    done = status("done", tracker, 3, 5, 1, 6.0)
    assert done["eta_s"] == 0 and done["images"]["estimated_total"] == 5


def test_talora_status_reads_the_status_file_of_an_output_s_one_run_and_names_several(tmp_path, capsys):
    from talora.batch.commit import RunOutput, ShardTracker
    from talora.batch.parts import PARQUET
    from talora.batch.pipeline import status
    from talora.cli.main import main

    assert main(["status", str(tmp_path)]) == 2  # nothing committed yet
    assert "no _status.json here or one level below" in capsys.readouterr().err
    run = RunOutput(str(tmp_path), "k1", None, PARQUET)
    tracker = ShardTracker(run, ["a", "b"])
    tracker.add("a", "a/0.jpg", 0, shard_items=1)
    run.write_status(status("running", tracker, 0, 1, 0, 2.0))
    for where in (str(tmp_path), str(tmp_path / "k1")):  # the job's --output, or the run itself
        assert main(["status", where]) == 0
        line = capsys.readouterr().out.strip()
        assert line.startswith(f"{tmp_path / 'k1'}: running at ") and line.endswith(
            "1/2 shards, 1/~2 images, 0.5 images/s, ETA 0:02, 0 error(s)")
    assert main(["status", str(tmp_path), "--json"]) == 0
    assert '"committed": 1' in capsys.readouterr().out
    RunOutput(str(tmp_path), "k2", None, PARQUET).write_status(status("done", tracker, 0, 1, 0, 2.0))
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds 2 runs; name one" in err and str(tmp_path / "k2") in err


def test_the_steady_rate_counts_images_after_the_first_commit_and_is_none_for_one_burst():
    from talora.batch.pipeline import steady_rate

    assert steady_rate(90, first_commit=10.0, start=0.0, end=40.0) == 3.0  # 90 images in the 30 s after it
    assert steady_rate(3, first_commit=59.63, start=0.0, end=59.64) is None  # they came back with the first shard
    assert steady_rate(0, first_commit=10.0, start=0.0, end=40.0) is None and steady_rate(5, None, 0.0, 9.0) is None
