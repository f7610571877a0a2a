"""The quality suite's opt-in ablations: adapter types at equal steps, and where the adapters go
(decoder only vs encoder tail k = 1, 2) with the per-prompt cost."""

from __future__ import annotations

import torch

from talora.bench.quality.config import QualityConfig
from talora.bench.quality.runs import run_spec, trained_hypernet
from talora.bench.timing import median_seconds
from talora.core.text import TextEncoder
from talora.data.tasks import GROUPS
from talora.eval.metrics import mean
from talora.model.loading import load_task_aware_sam
from talora.train.step import TrainStep
from talora.train.validate import per_task, score_tasks, validation_rows


def ablations(config: QualityConfig, train_uri: str, val_uri: str, val, image_ids, tasks) -> dict:
    """Hypernets trained side by side at equal steps: lora vs tucker adapters, decoder-only vs
    encoder tail k = 1, 2; each with its task mIoU per group, the values its hypernet generates per
    adapter, and the seconds per prompt of the adapted part (tail + semantic decode) on one image."""
    steps = config.ablation_steps or config.hypernet_steps or 1000
    variants = {"lora": {}, "tucker": {"hypernet": {"adapter_type": "tucker"}},
                "decoder_only": {"lora": {"image_encoder": False}}}
    default_k = run_spec(config, train_uri, val_uri, max_steps=1).model.tail_blocks
    for k in (1, 2):  # the preset's own k is the `lora` run itself
        variants[f"tail_k{k}"] = {} if k == default_k else {"lora": {"tail_blocks": k}}
    rows = validation_rows(list(tasks), static=False)
    encoder = TextEncoder()
    out = {"steps": steps}
    for name, fields in variants.items():
        file = trained_hypernet(config, train_uri, val_uri, steps, name="ablation", **fields)  # a repeated spec trains once
        model = load_task_aware_sam(file, config.sam_checkpoint, encoder, config.storage).eval()
        kind, rank = model.config.hypernet.adapter_type, model.config.lora.rank
        with torch.no_grad():
            text = encoder.encode([p for _, _, p in rows])
            ious = per_task(score_tasks(TrainStep(model, model.hypernet).eval(), val, image_ids, rows, text))
            # lora: A and B per target (r x (in + out)); tucker: an r x r core per target
            generated = (sum(a.numel() + b.numel() for a, b in model.hypernet(text[:1]).weights.values())
                         if kind == "lora" else rank * rank * len(model.targets))
            adapter = model.adapters([rows[0][2]])
            x, _ = model.preprocess(val.load_image(image_ids[0]))
            trunk = model.embed_trunk(x[None])

            def adapted(trunk=trunk, adapter=adapter, model=model) -> None:
                model.decode(model.embed_tail(trunk, adapter), adapter, multimask_output=False)

            per_prompt = median_seconds(adapted, 1.0)[0]
        out[name] = {"tail_blocks": model.tail_blocks, "adapter_type": kind, "generated_values_per_adapter": generated,
                     "s_per_prompt": per_prompt, **{f"miou_{g}": mean(ious.get(g, {}).values()) for g in GROUPS}}
    return out
