"""Taking an adapter out of talora: merged into a SAM checkpoint, or as a PEFT adapter folder.

PEFT folder: ``adapter_config.json`` (LoRA, r, lora_alpha, target_modules = the exact module
names inside the family's own model; base_model_name_or_path = the family's `peft_base`) and
``adapter_model.safetensors`` with keys
``base_model.model.<target>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r). PEFT's scale
lora_alpha / r is talora's alpha / rank, so ``PeftModel.from_pretrained(sam, folder)`` computes
what talora's merged adapter computes (tested).
"""

from __future__ import annotations

import json

from talora.backbones.variants import family_of
from talora.model.files import load_adapter
from talora.model.loading import load_backbone, save_backbone
from talora.core.lora import LoraTarget, inject_lora, merge_adapter
from talora.io.storage import StorageOptions, join, write_bytes
from talora.io.weights import write_weights


def export_peft(adapter_uri: str, out_dir: str, storage: StorageOptions | None = None) -> list[str]:
    """Writes the PEFT folder for one adapter file; returns the files written."""
    adapter, header = load_adapter(adapter_uri, storage=storage)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": header.rank,
        "lora_alpha": header.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": [t["name"] for t in header.targets],
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "base_model_name_or_path": family_of(header.sam_type).peft_base.format(variant=header.sam_type),
        "revision": None,
    }
    # talora's own provenance rides in the weights file's header, where PEFT ignores it.
    provenance = {"format": "pt", "talora_prompt": header.prompt, "talora_sam_type": header.sam_type,
                  "talora_hypernet_digest": header.hypernet_digest}
    tensors = {}
    for name, (a, b) in adapter.weights.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    files = [join(out_dir, "adapter_config.json"), join(out_dir, "adapter_model.safetensors")]
    write_bytes(files[0], json.dumps(config, indent=2).encode(), storage)
    write_weights(files[1], tensors, provenance, storage)
    return files


def merge_into_checkpoint(adapter_uri: str, sam_checkpoint: str | None, out: str,
                          storage: StorageOptions | None = None) -> str:
    """A full SAM checkpoint (safetensors) with the adapter merged into its weights; the variant
    comes from the adapter's header and is checked against `sam_checkpoint`."""
    _, header = load_adapter(adapter_uri, storage=storage)
    backbone = load_backbone(header.sam_type, sam_checkpoint, storage)
    sam = backbone.model
    targets = []
    for t in header.targets:
        try:
            module = sam.get_submodule(t["name"])
        except AttributeError as e:
            raise ValueError(f"adapter {adapter_uri} targets {t['name']}, which {header.sam_type} does not have") from e
        targets.append(LoraTarget(t["name"], module.in_features, module.out_features, "", 0, ""))
    inject_lora(sam, targets)
    adapter, _ = load_adapter(adapter_uri, targets, header.sam_type, storage)  # shapes checked against the model
    merge_adapter(sam, adapter)
    save_backbone(backbone, out, storage)
    return out
