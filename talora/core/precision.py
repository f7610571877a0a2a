"""Whether a CPU computes a low-precision dtype in hardware.

On a CPU without bf16 (or fp16) instructions, oneDNN and ATen emulate the dtype: autocast then runs
each matmul through conversions and reference kernels, and a vit_tiny pretraining step measured
7.7x slower in bf16 than in fp32 (docs/training.md, AMP), where with the
instructions bf16 is the faster of the two."""

from __future__ import annotations

import os

import torch

# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) that keep its bf16 / fp16 instructions
_BF16_ISAS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
              "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "DEFAULT", "ALL"}
_FP16_ISAS = {"AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512_AMX_2", "DEFAULT", "ALL"}


def cpu_has_native(dtype: torch.dtype) -> bool:
    """True when this CPU has instructions for `dtype` (bf16: AVX512-BF16 or AMX; fp16: AMX-FP16)
    and no oneDNN ISA limit in the environment takes them away; float32 always."""
    if dtype == torch.float32:
        return True
    limit = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if dtype == torch.bfloat16:
        return limit in _BF16_ISAS and (_probe("_is_avx512_bf16_supported") or _probe("_is_amx_tile_supported"))
    if dtype == torch.float16:
        return limit in _FP16_ISAS and _probe("_is_amx_fp16_supported")
    return False


def _probe(name: str) -> bool:
    """torch.cpu's CPUID probe `name` (False where this torch has none)."""
    probe = getattr(torch.cpu, name, None)
    return bool(probe()) if probe else False
