"""Watching a run for collapse: the model answering every prompt with an empty mask.

A learning rate too high for a base drives SAM's mask logits below zero everywhere within a few
dozen steps, after which the losses stop moving and every later step is wasted. Each step's losses
carry `empty_<rows>`: of the rows whose target has a pixel, the share whose every candidate mask
is empty (talora.train.losses.empty_share). When that share stays at or above `threshold` over a
whole window of steps after warm-up, the log says so, once per kind of row."""

from __future__ import annotations

from collections import deque


class CollapseWatch:
    def __init__(self, window: int, warmup_steps: int, lr: float, threshold: float = 0.9) -> None:
        """`lr`: train.lr as the config gives it (the log names it to lower)."""
        self.window, self.warmup_steps, self.lr, self.threshold = max(1, window), warmup_steps, lr, threshold
        self.recent: dict[str, deque] = {}
        self.said: set[str] = set()

    def update(self, step: int, metrics: dict) -> list[str]:
        """This step's `empty_*` metrics in; the log lines for kinds that just collapsed out."""
        lines = []
        for key, value in metrics.items():
            if not key.startswith("empty_"):
                continue
            recent = self.recent.setdefault(key, deque(maxlen=self.window))
            recent.append(float(value))
            mean = sum(recent) / len(recent)
            if (key not in self.said and step > self.warmup_steps and len(recent) == self.window
                    and mean >= self.threshold):
                self.said.add(key)
                rows = key.removeprefix("empty_")
                lines.append(f"collapse: step {step}: {mean:.0%} of the {rows} masks whose target has pixels came "
                             f"out empty over the last {self.window} steps; the run is heading to empty masks. "
                             f"Stop it and relaunch with a lower train.lr (now {self.lr:g}), e.g. a third")
        return lines
