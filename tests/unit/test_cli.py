import json
import os
import subprocess
import sys

import torch

from talora.model.files import load_adapter
from talora.cli.main import main
from talora.config import default_config
from talora.model.loading import build_task_aware_sam
from talora.model.loading import save_hypernet


def test_info_json_lists_targets_and_parameter_counts(capsys):
    assert main(["info", "--sam-type", "vit_b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sam_type"] == "vit_b" and info["tail_blocks"] == 2
    names = [t["name"] for t in info["targets"]]
    assert "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj" in names
    q = next(t for t in info["targets"] if t["name"].endswith("token_to_image.q_proj"))
    assert (q["in_features"], q["out_features"]) == (256, 128)
    assert 0 < info["trainable_params"] < info["total_params"]
    assert abs(info["trainable_percent"] - 100 * info["trainable_params"] / info["total_params"]) < 1e-9


def test_info_text_output_from_the_console_script():
    talora = os.path.join(os.path.dirname(sys.executable), "talora")
    out = subprocess.run([talora, "info", "--sam-type", "vit_tiny"], capture_output=True, text=True, check=True).stdout
    assert "image_encoder.blocks.3.attn.qkv" in out and "36 targets" in out and "trainable" in out


def test_adapter_from_the_untrained_hypernet_is_a_zero_delta_adapter(tmp_path, capsys):
    out = tmp_path / "adapter.safetensors"
    assert main(["adapter", "--prompt", "segment vehicles", "--sam-type", "vit_tiny", "--untrained", "--out", str(out)]) == 0
    adapter, header = load_adapter(str(out), sam_type="vit_tiny")
    assert header.prompt == "segment vehicles" and len(adapter.weights) == 36
    assert all(torch.count_nonzero(adapter.delta_weight(n)) == 0 for n in adapter.weights)
    assert "segment vehicles" in capsys.readouterr().out


def test_adapter_from_a_hypernet_file_matches_the_model(tmp_path, text_encoder):
    torch.manual_seed(0)
    model = build_task_aware_sam(default_config("vit_tiny"), text_encoder)
    with torch.no_grad():
        for head in model.hypernet.heads.values():
            head.weight.normal_(0, 0.02)
    save_hypernet(model, str(tmp_path / "h.safetensors"))
    out = tmp_path / "a.safetensors"
    assert main(["adapter", "--prompt", "segment red apples", "--hypernet", str(tmp_path / "h.safetensors"), "--out", str(out)]) == 0
    adapter, header = load_adapter(str(out), model.targets, "vit_tiny")
    assert header.hypernet_digest == model.hypernet.digest()
    model.eval()
    with torch.no_grad():
        expected = model.adapters(["segment red apples"]).row(0)
    for name in expected.weights:
        torch.testing.assert_close(adapter.delta_weight(name), expected.delta_weight(name))
    assert any(torch.count_nonzero(adapter.delta_weight(n)) for n in adapter.weights)


def test_bad_input_exits_non_zero_with_a_message_naming_it(tmp_path, capsys):
    assert main(["adapter", "--prompt", "   ", "--out", str(tmp_path / "a.safetensors")]) == 2
    assert "prompt 0 is empty" in capsys.readouterr().err
    assert main(["adapter", "--prompt", "x", "--hypernet", str(tmp_path / "missing.safetensors"), "--out", "o"]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("lora:\n  rnak: 4\n")
    assert main(["info", "--config", str(config)]) == 2
    assert "lora.rnak" in capsys.readouterr().err
    assert not (tmp_path / "a.safetensors").exists()



def test_a_store_that_does_not_answer_exits_3_in_one_line_and_any_other_failure_exits_1(monkeypatch, capsys):
    import talora.io.storage as storage
    from talora.batch.cluster import free_port

    monkeypatch.setattr(storage, "RETRY_DELAYS_S", (0.0,))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    port = free_port()  # a loopback port nothing listens on
    code = main(["tasks", "--annotations", "s3://nowhere/instances.json", "--s3-endpoint-url", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1, err
    assert err[0].startswith(f"talora tasks: error: object storage at http://127.0.0.1:{port} did not answer")
    assert "Traceback" not in "\n".join(err) and "rerun the same command" in err[0]

    import talora.cli.main as cli

    monkeypatch.setattr(cli, "CocoDataset", None)  # an unexpected failure inside a verb
    assert main(["tasks", "--annotations", "x.json"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "talora tasks: failed"

def test_demo_data_and_tasks_commands(tmp_path, capsys):
    assert main(["demo-data", "--out", str(tmp_path / "demo"), "--num-images", "12", "--num-val", "3", "--seed", "1"]) == 0
    assert "wrote 15 images" in capsys.readouterr().out
    assert main(["tasks", "--annotations", str(tmp_path / "demo" / "train" / "instances.json"), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    ids = {t["id"] for t in listing["tasks"]}
    assert {"supercategory:vehicle", "category:car", "color:red"} <= ids
    vehicles = next(t for t in listing["tasks"] if t["id"] == "supercategory:vehicle")
    assert "segment vehicles" in vehicles["train_prompts"] and vehicles["heldout_prompts"]
    assert any(t["heldout_composition"] for t in listing["tasks"])


def test_predict_draws_an_overlay_for_every_prompt(tmp_path, capsys):
    from talora.data.synthetic import write_demo_dataset

    write_demo_dataset(str(tmp_path / "demo"), num_train=1, num_val=1, seed=0)
    image = next((tmp_path / "demo" / "val" / "images").iterdir())
    out = tmp_path / "overlay.png"
    assert main(["predict", "--image", str(image), "--prompt", "segment vehicles", "--prompt", "segment fruit",
                 "--presence-thresh", "0", "--points-per-side", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "'segment vehicles':" in printed and "'segment fruit':" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_with_boxes_gives_one_instance_per_box_and_a_thin_image_is_labelled(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "overlay.png"
    assert main(["predict", "--image", str(image), "--prompt", "segment vehicles", "--box", "10,5,30,20",
                 "--box", "50,30,40,30", "--presence-thresh", "1", "--out", str(out)]) == 0
    assert "'segment vehicles': 0 semantic mask, 2 instance(s)" in capsys.readouterr().out  # boxes beat presence
    assert main(["predict", "--image", str(image), "--prompt", "segment vehicles", "--box", "10,5,0,20",
                 "--out", str(out)]) == 2
    assert "--box '10,5,0,20': expected x,y,w,h" in capsys.readouterr().err
    thin = tmp_path / "thin.png"
    Image.new("RGB", (3000, 4), (200, 20, 20)).save(thin)  # the short side rounds to 0 pixels in the model frame
    assert main(["predict", "--image", str(thin), "--prompt", "segment vehicles", "--points-per-side", "4",
                 "--out", str(out)]) == 0


def test_viz_writes_one_overlay_per_image(tmp_path):
    from talora.data.coco import CocoDataset
    from talora.data.synthetic import write_demo_dataset
    from tests.unit.test_evaluate import _commit

    written = write_demo_dataset(str(tmp_path / "demo"), num_train=1, num_val=3, seed=2)
    run = _commit(tmp_path, CocoDataset.load(written["val"]), {"segment vehicles": "supercategory:vehicle"})
    assert main(["viz", "--predictions", run, "--out", str(tmp_path / "viz")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "viz").iterdir())
    assert pngs and all(name.endswith(".png") for name in pngs)
