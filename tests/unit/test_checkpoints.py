"""SAM, hypernet and adapter files: round trips through a temp dir and through s3:// (moto)."""

import pytest
import torch

from talora.model.files import AdapterHeader, load_adapter, save_adapter
from talora.config import default_config
from talora.model.loading import (
    build_task_aware_sam,
    check_checkpoint,
    load_backbone,
    load_task_aware_sam,
    save_backbone,
    save_hypernet,
)
from talora.io.storage import read_bytes, write_bytes


def _assert_same_weights(a, b):
    sa, sb = getattr(a, "model", a).state_dict(), getattr(b, "model", b).state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def tiny_sam():
    torch.manual_seed(1)
    return load_backbone("vit_tiny")


def test_sam_checkpoint_round_trip_through_a_temp_dir(tiny_sam, tmp_path):
    uri = str(tmp_path / "base" / "sam_vit_tiny.safetensors")
    save_backbone(tiny_sam, uri)
    _assert_same_weights(load_backbone("vit_tiny", uri), tiny_sam)


def test_sam_checkpoint_round_trip_through_s3(tiny_sam, s3):
    uri = "s3://talora-test/models/sam_vit_tiny.safetensors"
    save_backbone(tiny_sam, uri, s3)
    _assert_same_weights(load_backbone("vit_tiny", uri, s3), tiny_sam)


def test_torch_save_checkpoints_load_with_weights_only(tiny_sam, tmp_path):
    path = tmp_path / "sam_vit_tiny.pth"
    torch.save(tiny_sam.model.state_dict(), path)  # the official checkpoints' format
    _assert_same_weights(load_backbone("vit_tiny", f"file://{path}"), tiny_sam)


def test_a_checkpoint_that_would_unpickle_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1), "x": object()}, path)
    with pytest.raises(ValueError, match=str(path)):
        load_backbone("vit_tiny", str(path))


def test_wrong_variant_names_the_uri_and_both_variants(tiny_sam, tmp_path):
    uri = str(tmp_path / "sam.safetensors")
    save_backbone(tiny_sam, uri)
    with pytest.raises(ValueError) as e:
        load_backbone("vit_b", uri)
    assert str(e.value) == f"checkpoint {uri} has keys for vit_tiny, but --sam-type vit_b was given"


def test_a_safetensors_base_is_checked_from_its_header_alone(tiny_sam, tmp_path, s3):
    """The driver's variant check reads the header only: a file whose tensor bytes are cut off still
    passes it (loading it fails), another variant is refused by name, a broken header is an error."""
    whole = str(tmp_path / "sam.safetensors")
    save_backbone(tiny_sam, whole)
    data = read_bytes(whole)
    header_end = 8 + int.from_bytes(data[:8], "little")
    uri = "s3://talora-test/cut/sam.safetensors"
    write_bytes(uri, data[: header_end + 16], s3)
    check_checkpoint(uri, "vit_tiny", s3)
    with pytest.raises(ValueError, match="corrupt"):
        load_backbone("vit_tiny", uri, s3)
    with pytest.raises(ValueError, match=f"checkpoint {uri} has keys for vit_tiny, but --sam-type sam2_tiny was given"):
        check_checkpoint(uri, "sam2_tiny", s3)
    write_bytes(uri, (10**12).to_bytes(8, "little") + data[8:], s3)
    with pytest.raises(ValueError, match=f"{uri} is corrupt or not a safetensors file"):
        check_checkpoint(uri, "vit_tiny", s3)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    for name in ("sam.safetensors", "sam.pth"):
        path = tmp_path / name
        path.write_bytes(b"\x00garbage" * 50)
        with pytest.raises(ValueError, match=f"{path}.*corrupt"):
            load_backbone("vit_tiny", str(path))


def test_missing_checkpoint_names_the_uri(tmp_path, s3):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone("vit_tiny", str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="s3://talora-test/nope.pth"):
        load_backbone("vit_tiny", "s3://talora-test/nope.pth", s3)


def test_hypernet_file_round_trip_restores_weights_and_config(tmp_path, s3):
    config = default_config("vit_tiny")
    torch.manual_seed(0)
    model = build_task_aware_sam(config)
    with torch.no_grad():
        for head in model.hypernet.heads.values():
            head.weight.normal_()
    for uri, storage in ((str(tmp_path / "hypernet.safetensors"), None), ("s3://talora-test/h.safetensors", s3)):
        save_hypernet(model, uri, storage)
        loaded = load_task_aware_sam(uri, storage=storage)
        assert loaded.config == config
        assert loaded.hypernet.digest() == model.hypernet.digest()
        _assert_same_weights(loaded.trainable_modules(), model.trainable_modules())


def test_a_non_hypernet_file_is_refused_as_a_hypernet(tiny_sam, tmp_path):
    uri = str(tmp_path / "sam.safetensors")
    save_backbone(tiny_sam, uri)
    with pytest.raises(ValueError, match="not a talora hypernet file"):
        load_task_aware_sam(uri)


def _header(model, prompt="segment vehicles", sam_type="vit_tiny"):
    return AdapterHeader(
        sam_type=sam_type, rank=4, alpha=8.0, prompt=prompt, hypernet_digest=model.hypernet.digest(),
        targets=[{"name": t.name, "in_features": t.in_features, "out_features": t.out_features} for t in model.targets],
    )


def test_adapter_file_round_trip(tiny_model, make_adapter, tmp_path, s3):
    adapter = make_adapter(tiny_model.targets, seed=3)
    for uri, storage in ((str(tmp_path / "a.safetensors"), None), ("s3://talora-test/a.safetensors", s3)):
        save_adapter(uri, adapter, _header(tiny_model), storage)
        loaded, header = load_adapter(uri, tiny_model.targets, "vit_tiny", storage)
        assert header.prompt == "segment vehicles" and header.rank == 4 and header.alpha == 8.0
        assert list(loaded.weights) == list(adapter.weights)
        assert all(torch.equal(loaded.weights[n][i], adapter.weights[n][i]) for n in adapter.weights for i in (0, 1))
        assert loaded.scale == 2.0


def test_adapter_header_is_validated_against_the_model(tiny_model, make_adapter, tmp_path):
    uri = str(tmp_path / "a.safetensors")
    save_adapter(uri, make_adapter(tiny_model.targets), _header(tiny_model))
    with pytest.raises(ValueError, match="made for vit_tiny, but the model is vit_b"):
        load_adapter(uri, sam_type="vit_b")

    # A model that adapts fewer targets (decoder only) cannot take this adapter.
    decoder_only = [t for t in tiny_model.targets if t.component == "mask_decoder"]
    with pytest.raises(ValueError, match="image_encoder.blocks.3.attn.qkv, which this model does not adapt"):
        load_adapter(uri, decoder_only)

    # A header whose shapes disagree with the tensors is caught too.
    header = _header(tiny_model)
    header.targets[0]["in_features"] += 1
    save_adapter(uri, make_adapter(tiny_model.targets), header)
    with pytest.raises(ValueError, match="header says rank 4"):
        load_adapter(uri)


def test_a_per_row_adapter_cannot_be_saved_as_one_prompt(tiny_model, make_adapter, tmp_path):
    with pytest.raises(ValueError, match="one prompt"):
        save_adapter(str(tmp_path / "a.safetensors"), make_adapter(tiny_model.targets, rows=2), _header(tiny_model))


def test_a_runs_latest_and_best_checkpoint_come_from_its_summary(tmp_path, s3, capsys):
    import json

    from talora.cli.main import main
    from talora.io.storage import write_bytes
    from talora.train.checkpoint import run_checkpoint

    run = tmp_path / "run"
    write_bytes(str(run / "summary.json"), json.dumps({"latest_checkpoint": f"{run}/checkpoint_2",
                                                       "best_checkpoint": f"{run}/checkpoint_1"}).encode())
    assert run_checkpoint(str(run)) == f"{run}/checkpoint_2"
    assert run_checkpoint(str(run), "best") == f"{run}/checkpoint_1"
    assert main(["checkpoint", str(run), "--best", "--file", "hypernet.safetensors"]) == 0
    assert capsys.readouterr().out.strip() == f"{run}/checkpoint_1/hypernet.safetensors"
    # on object storage Ray Train reports paths without the scheme
    write_bytes("s3://talora-test/runs/r/summary.json",
                json.dumps({"latest_checkpoint": "talora-test/runs/r/checkpoint_0", "best_checkpoint": None}).encode(), s3)
    assert run_checkpoint("s3://talora-test/runs/r", storage=s3) == "s3://talora-test/runs/r/checkpoint_0"
    with pytest.raises(FileNotFoundError, match="recorded no best checkpoint"):
        run_checkpoint("s3://talora-test/runs/r", "best", s3)
    with pytest.raises(FileNotFoundError, match="not a finished training run"):
        run_checkpoint(str(tmp_path / "none"))
    assert main(["checkpoint", str(tmp_path / "none")]) == 2
