"""The quality suite (`jobs/benchmark.py --suite quality`): talora against what a user would do
instead, on the same frozen SAM, the same validation images and the same tasks.

Methods, each scored per group (seen prompt, held-out paraphrase, held-out composition) by task
mIoU (its semantic masks) and mask AP / AP50 (its instances; COCOeval with the tasks as categories):

- amg: no adapter at all: the family's own automatic mask generator on the same base (the
  same grid and filters as the instance pass), every mask labelled with every task and scored by
  its predicted IoU; its semantic mask is the union of its masks;
- no_adapter: the task-aware model with Delta W = 0 (one prompt-free answer for every task);
- hypernet: the given (or shipped, or freshly trained) hypernet;
- random_text: the same hypernet fed another task's prompt (seeded): does the text matter?
- gt_region: the hypernet's instance pass inside the ground-truth task region instead of its own:
  the instance stage's ceiling under perfect recognition (mIoU: n/a);
- gt_region_base: the base's instance pass (Delta W = 0) inside the ground-truth task region: what
  the adapter adds to the point masks;
- oracles: one static LoRA per drawn task, trained for `oracle_steps` on the same base, beside the
  hypernet's mIoU on the same task (seen prompt) and their ratio;
- references from the ground truth: every object, attribute only, category only (task mIoU);
- ablations (opt-in, they train): lora vs tucker adapters at equal steps with the values the
  hypernet generates per adapter; decoder-only vs encoder tail k = 1, 2 with the per-prompt cost.

A dataset whose categories carry no attributes has category and supercategory tasks only; the
composition group is then reported as absent (None), not as an error.

Modules: `config`, `runs`, `scoring`, `ablations`, `suite`, `report` (each imports only those before it);
the suite's API is re-exported here.
"""

from __future__ import annotations

from talora.bench.quality.config import METHODS, QualityConfig
from talora.bench.quality.suite import run_quality
from talora.bench.quality.report import markdown, write_results

__all__ = ["METHODS", "QualityConfig", "run_quality", "markdown", "write_results"]
