"""Hardware choices: CPU threads and the mixed precision that the machine supports."""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX), so bf16 autocast speeds it up."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def uses_cuda(accelerator: str) -> bool:
    return accelerator in {"auto", "gpu", "cuda"} and torch.cuda.is_available()


def resolve_precision(precision: str, accelerator: str) -> str:
    """Lightning's precision for `auto`: bf16-mixed where the hardware has bf16, 16-mixed on older GPUs."""
    if precision != "auto":
        return precision
    if uses_cuda(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator in {"auto", "cpu"} and cpu_has_bf16():
        return "bf16-mixed"
    return "32-true"
