"""Static LoRA: one plain adapter trained directly (the per-task oracle and the fine-tuning path).

Same targets, rank and scale as the hypernet's adapters, with the standard LoRA init (A
kaiming-uniform as in peft, B = 0, so Delta W = 0 at start). `forward()` returns a shared
Adapter, so every code path that takes a hypernet's per-row adapter takes this one too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from talora.core.lora import Adapter, LoraTarget


class StaticLora(nn.Module):
    def __init__(self, targets: list[LoraTarget], rank: int, scale: float) -> None:
        super().__init__()
        self.names = [t.name for t in targets]
        self.scale = scale
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for t in targets:
            a = torch.empty(rank, t.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(torch.zeros(t.out_features, rank)))

    def forward(self) -> Adapter:
        return Adapter({n: (a, b) for n, a, b in zip(self.names, self.lora_A, self.lora_B)}, self.scale)
