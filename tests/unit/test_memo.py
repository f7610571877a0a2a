"""The bounded per-image memo (talora.train.memo) and what the training loop builds on it: trunk
features kept in CPU memory within a budget, validation in chunks of a step's rows."""

import pytest
import torch

from talora.data.coco import CocoDataset
from talora.data.synthetic import write_demo_dataset
from talora.adapters.static import StaticLora
from talora.data.tasks import TaskSet
from talora.train.config import TrainConfig
from talora.train.memo import TrunkMemo
from talora.train.memo import LruMemo, tensor_bytes
from talora.train.pretrain import ImageEntry
from talora.train.step import TrainStep
from talora.train.validate import per_task, validate, validation_rows


def _recorder(nbytes: int = 256):
    built = []

    def build(key):
        built.append(key)
        return torch.zeros(nbytes, dtype=torch.uint8)

    return build, built


def test_memo_keeps_entries_within_its_byte_budget_and_drops_the_least_recently_used():
    build, built = _recorder()
    memo = LruMemo(build, max_bytes=512)
    first = memo(1)
    memo(2)
    assert memo(1) is first  # a hit: 1 becomes the most recently used
    memo(3)  # over budget: 2 goes, not 1
    assert list(memo.entries) == [1, 3] and memo.nbytes == 512 and memo.dropped == 1
    memo(1)
    memo(2)  # dropped earlier, so built again
    assert built == [1, 2, 3, 2] and memo.builds == 4


def test_an_entry_larger_than_the_budget_is_returned_but_not_kept():
    build, built = _recorder(nbytes=1024)
    memo = LruMemo(build, max_bytes=512)
    assert memo(7).numel() == 1024 and len(memo) == 0 and memo.nbytes == 0
    memo(7)
    assert built == [7, 7] and memo.dropped == 2


def test_tensor_bytes_counts_every_tensor_inside_an_entry():
    entry = ImageEntry(image=torch.zeros(3, 4, 4, dtype=torch.float16), masks=torch.zeros(1, 2, 2, dtype=torch.float16),
                       boxes=torch.zeros(1, 4), cells={"category": torch.zeros(2, 3), "color": torch.zeros(2, 2)},
                       input_size=(4, 4))
    assert tensor_bytes(entry) == 96 + 8 + 16 + 24 + 16
    assert tensor_bytes((torch.zeros(5, dtype=torch.float64), (16, 16))) == 40


def test_a_negative_memo_budget_is_refused_by_name():
    with pytest.raises(ValueError, match="train.memo_gb"):
        TrainConfig(train_annotations="a.json", memo_gb=-1)


@pytest.fixture(scope="module")
def demo_val(tmp_path_factory):
    written = write_demo_dataset(str(tmp_path_factory.mktemp("demo")), num_train=0, num_val=3, seed=0)
    return CocoDataset.load(written["val"])


def test_trunk_memo_holds_cpu_features_within_its_budget_and_recomputes_the_same_ones(tiny_model, demo_val):
    calls = []
    embed_trunk = tiny_model.embed_trunk
    tiny_model.embed_trunk = lambda x: calls.append(len(x)) or embed_trunk(x)
    a, b, c = demo_val.image_ids
    probe = TrunkMemo(tiny_model, demo_val, None, torch.device("cpu"), max_bytes=2**40)
    one_image = tensor_bytes(probe(a))
    memo = TrunkMemo(tiny_model, demo_val, None, torch.device("cpu"), max_bytes=2 * one_image)
    features, input_size = memo(a)
    memo(b)
    memo(a)
    assert len(calls) == 3  # the probe's image, then a and b once each
    memo(c)  # drops b
    again, _ = memo(b)
    assert len(calls) == 5 and memo.dropped == 2 and len(memo) == 2
    assert features.device.type == "cpu" and input_size == (256, 256)
    assert torch.equal(again, TrunkMemo(tiny_model, demo_val, None, torch.device("cpu"), 2**40)(b)[0])


def test_validation_in_chunks_scores_as_one_pass_and_never_runs_more_rows_than_the_chunk(tiny_model, demo_val):
    torch.manual_seed(0)
    lora = StaticLora(tiny_model.targets, tiny_model.config.lora.rank, tiny_model.config.lora.scale).double()
    for b in lora.lora_B:
        torch.nn.init.normal_(b, std=0.5)  # a non-zero adapter: rows differ only through it
    step = TrainStep(tiny_model, lora).eval()
    rows = validation_rows(list(TaskSet.from_dataset(demo_val)), static=True)
    memo = TrunkMemo(tiny_model, demo_val, None, torch.device("cpu"), 2**40)
    entries = [(demo_val.images[i], *memo(i)) for i in demo_val.image_ids]
    passes = []
    embed_tail = tiny_model.embed_tail
    tiny_model.embed_tail = lambda trunk, adapter: passes.append(len(trunk)) or embed_tail(trunk, adapter)

    whole = validate(step, entries, demo_val, rows, None, chunk=len(rows))
    assert passes == [len(rows)] * len(entries)
    passes.clear()
    chunked = validate(step, iter(entries), demo_val, rows, None, chunk=3)  # entries may be a generator
    assert len(rows) > 3 and max(passes) == 3 and sum(passes) == len(rows) * len(entries)
    assert per_task(chunked) == per_task(whole)
    assert len(set(per_task(whole)["seen"].values())) > 2  # real scores, not all zero
