"""Adapters out of talora: merged SAM checkpoints, PEFT folders, run curves."""

import json

import torch

from talora.model.files import AdapterHeader, save_adapter
from talora.cli.main import main
from talora.core.lora import merge_adapter, remove_lora
from talora.model.loading import load_backbone, save_backbone


def _saved_adapter(model, make_adapter, tmp_path):
    adapter = make_adapter(model.targets, seed=4)
    adapter = type(adapter)({n: (a.float(), b.float()) for n, (a, b) in adapter.weights.items()}, adapter.scale)
    header = AdapterHeader("vit_tiny", 4, 8.0, "segment vehicles", "test",
                           [{"name": t.name, "in_features": t.in_features, "out_features": t.out_features}
                            for t in model.targets])
    save_adapter(str(tmp_path / "a.safetensors"), adapter, header)
    return adapter


def _encode_decode(sam, image, coords, labels):
    with torch.no_grad():
        embedding = sam.image_encoder(image)
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        return embedding, sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, True)


def test_merge_writes_a_sam_checkpoint_equal_to_the_merged_adapter(tmp_path, make_adapter):
    from talora.config import default_config
    from talora.model.loading import build_task_aware_sam

    torch.manual_seed(0)
    model = build_task_aware_sam(default_config("vit_tiny"))
    base = str(tmp_path / "base.safetensors")
    save_backbone(model.backbone, base)
    adapter = _saved_adapter(model, make_adapter, tmp_path)
    assert main(["merge", "--adapter", str(tmp_path / "a.safetensors"), "--sam-checkpoint", base,
                 "--out", str(tmp_path / "merged.safetensors")]) == 0

    merged = load_backbone("vit_tiny", str(tmp_path / "merged.safetensors")).model
    merge_adapter(model.sam, adapter)  # talora's own merge, in place
    image, coords, labels = torch.randn(1, 3, 256, 256), torch.rand(2, 1, 2) * 256, torch.ones(2, 1)
    want = _encode_decode(model.sam, image, coords, labels)
    got = _encode_decode(merged, image, coords, labels)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1][0], want[1][0])


def test_peft_loads_the_exported_folder_with_outputs_equal_to_the_merged_adapter(tmp_path, make_adapter):
    from peft import PeftModel

    from talora.config import default_config
    from talora.model.loading import build_task_aware_sam

    torch.manual_seed(0)
    model = build_task_aware_sam(default_config("vit_tiny"))
    adapter = _saved_adapter(model, make_adapter, tmp_path)
    assert main(["export-peft", "--adapter", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0

    plain = load_backbone("vit_tiny").model
    plain.load_state_dict({k.replace(".base_layer.", "."): v for k, v in model.sam.state_dict().items()})
    peft_sam = PeftModel.from_pretrained(plain, str(tmp_path / "peft"))
    merge_adapter(model.sam, adapter)
    image, coords, labels = torch.randn(1, 3, 256, 256), torch.rand(2, 1, 2) * 256, torch.ones(2, 1)
    want = _encode_decode(model.sam, image, coords, labels)
    got = _encode_decode(peft_sam.base_model.model, image, coords, labels)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1][0], want[1][0], atol=1e-5, rtol=1e-4)
    remove_lora(model.sam)
    base = _encode_decode(model.sam, image, coords, labels)  # unmerged base: differs, so the test is not vacuous
    assert not torch.allclose(base[1][0], got[1][0], atol=1e-4)


def test_plot_run_draws_a_png(tmp_path):
    rows = [{"step": s, "loss": 5 - s * 0.1, "loss_semantic": 3.0} for s in range(1, 11)]
    rows[-1].update(val_miou_seen=0.4, val_score=0.4)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot-run", str(tmp_path)]) == 0
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
