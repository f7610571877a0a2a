"""The optimiser side of a training step: AdamW, the LR schedule, AMP (autocast + loss scaling)."""

from __future__ import annotations

import math

import torch

from talora.core.precision import cpu_has_native


def build_optimizer(parameters, cfg, world: int) -> torch.optim.AdamW:
    """AdamW at `cfg.lr` per worker's batch, scaled linearly with the number of workers."""
    return torch.optim.AdamW(parameters, lr=cfg.lr * world, weight_decay=cfg.weight_decay)


def lr_scheduler(optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps`, then constant or cosine to 0 at `max_steps`."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        if cfg.lr_schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, cfg.max_steps) / cfg.max_steps))
        return warm

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def amp_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """The dtype the training forward autocasts to on `device` (None: float32): `cfg.amp_dtype`
    when `cfg.amp`, except on a CPU that would only emulate it (talora.core.precision)."""
    if not cfg.amp:
        return None
    dtype = getattr(torch, cfg.amp_dtype)
    return dtype if device.type != "cpu" or cpu_has_native(dtype) else None


def amp_note(cfg, device: torch.device) -> str | None:
    """The log line for an AMP request this device runs in float32, else None."""
    if cfg.amp and amp_dtype(cfg, device) is None:
        return (f"train.amp runs in float32 here: this CPU has no {cfg.amp_dtype} instructions, and emulated "
                f"{cfg.amp_dtype} is several times slower than float32 (docs/training.md, AMP)")
    return None


def autocast(cfg, device: torch.device):
    """The training forward's autocast context: `amp_dtype(cfg, device)`, else a no-op."""
    dtype = amp_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def grad_scaler(cfg, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 AMP only: bf16 has fp32's exponent range, its gradients do not underflow."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(cfg, device) == torch.float16)


def backward_and_step(loss, scaler, optimizer, parameters, grad_clip: float, before_step=None) -> bool:
    """Scaled backward, unscale, clip, step, update. Returns False when the step was skipped
    because a gradient held an inf or a NaN (the scaler then lowers its scale). Losses are fp32.

    A non-finite *loss* is an error, not a skipped step: the forward itself overflowed (under fp16
    AMP, an activation above 65504 becomes inf; measured on an H100 with a random base and lr 3e-3,
    the adapted encoder tail's MLP overflowed after 10 steps). The scaler guards only gradients;
    skipping would leave the weights as they are and every later step would overflow the same way."""
    if not torch.isfinite(loss.detach()):
        raise FloatingPointError(
            f"the training loss is {float(loss.detach()):.4g}: the forward pass overflowed. Under fp16 AMP activations "
            "above 65504 become inf; use train.amp_dtype: bfloat16 (A100/H100), train.amp: false, or a lower "
            "train.lr")
    parameters = list(parameters)
    scaler.scale(loss).backward()
    if before_step is not None:
        before_step()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)  # skipped when the unscaled gradients hold an inf or a NaN
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return scale is None or scaler.get_scale() >= scale
