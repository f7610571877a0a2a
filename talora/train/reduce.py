"""Sums across the training workers: the one all-reduce the loop and validation share."""

from __future__ import annotations

import torch
import torch.distributed as dist


def sum_over_workers(rows: list[list[float]], device: torch.device) -> list[list[float]]:
    """Each worker's rows of numbers, summed element-wise over every worker (float64; the rows
    themselves on one worker)."""
    values = torch.tensor(rows, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return values.tolist()
