"""The actor layout a job chooses from the resources Ray reports, and its progress line and status file."""

import pytest

from talora.batch.pipeline import ActorLayout


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


def test_the_steady_rate_counts_images_after_the_first_commit_and_is_none_for_one_burst():
    from talora.batch.pipeline import steady_rate

    assert steady_rate(90, first_commit=10.0, start=0.0, end=40.0) == 3.0  # 90 images in the 30 s after it
    assert steady_rate(3, first_commit=59.63, start=0.0, end=59.64) is None  # they came back with the first shard
    assert steady_rate(0, first_commit=10.0, start=0.0, end=40.0) is None and steady_rate(5, None, 0.0, 9.0) is None
