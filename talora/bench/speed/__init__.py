"""The speed suite (`jobs/benchmark.py --suite speed`): the labelling and training hot paths,
measured side by side in one run, on the same model and the same images.

- floor: `TaskAwarePredictor` on decoded, resized arrays (no I/O), K prompts: what the labelling
  job cannot beat at the same threads;
- job: the labelling job end to end on a local Ray over every image (the same model, prompts and
  grid; the actor layout it chooses itself): wall seconds, time to the first committed shard,
  steady-state images/s (after the first commit) and `vs_floor` = job images/s ÷ floor images/s
  at the job's total torch threads (actors x threads, in one process);
- naive: the loop a first implementation writes — per image and prompt, encode the text, generate
  the adapter, run the whole encoder, decode — and `speedup` = naive ÷ floor seconds;
- prompts: K = 1, 2, 4, 8 on the floor path, seconds per image and the ratio to K = 1;
- reference: the family's own predictor (`Backbone.reference_predictor`: SAM's `SamPredictor`, SAM 2.1's
  `SAM2ImagePredictor`) on the same base (set_image, then one point, one mask) against talora's
  one-prompt semantic path (mode "semantic"), images/s ratio `vs_sam_predictor`: the GPU aim
  compares talora with SAM at the same precision;
- breakdown: seconds per image of each stage — decode/resize, trunk, tail, semantic decode,
  instance decode, filtering + NMS + upsampling + RLE, writing the rows (a Parquet part) — each
  timed on the same images from the stage before's saved outputs;
- train: one hypernet step from cached trunk features vs the same step encoding its images on the
  fly (fp32; on CUDA also fp16 and bf16 AMP, with peak memory), and a pretraining step on CPU presets;
- eval: COCOeval through pycocotools and faster-coco-eval on the same predictions, stats equal;
- memory: the benchmark process's peak RSS (and peak GPU memory on CUDA).

Models: the shipped demo models on the default variant; random weights of the real architecture otherwise
(official checkpoints cannot be fetched offline; speed does not depend on the values). Timing is
`torch.utils.benchmark.Timer.blocked_autorange` (warm-up, CUDA synchronised, median of timed
blocks). Numbers belong to the machine they were taken on: the results record it.

Modules: `config`, `training`, `references`, `stages`, `job`, `suite`, `report` (each imports only those before it);
the suite's API is re-exported here.
"""

from __future__ import annotations

from talora.bench.speed.config import PROMPTS, PROMPT_COUNTS, SpeedConfig, speed_config
from talora.bench.speed.suite import run_speed
from talora.bench.speed.report import markdown, write_results

__all__ = ["PROMPTS", "PROMPT_COUNTS", "SpeedConfig", "speed_config", "run_speed", "markdown", "write_results"]
