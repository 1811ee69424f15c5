"""Where tensors live and in which precision the frozen encoders run: decided here, once, and passed down.

`--device auto|cpu|cuda|cuda:N` (and `device:` in a config) resolve through `resolve_device`; extraction precision
`fp32|bf16|fp16` through `resolve_precision`. Everything else receives a `torch.device` and never decides on its own.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from spacil.errors import InputError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: Optional[str] = "auto") -> torch.device:
    """'auto' (or None) -> CUDA when available, else CPU; 'cpu', 'cuda', 'cuda:N' as given (InputError when unusable)."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: expected {DEVICE_CHOICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: expected {DEVICE_CHOICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def device_name(device: torch.device) -> str:
    """The resolved device as written to config.yaml and meta.json ('cpu', 'cuda', 'cuda:1')."""
    return str(device)


def resolve_precision(precision: Optional[str], device: torch.device) -> str:
    """None or 'auto' -> bf16 on CUDA, fp32 on the CPU; otherwise one of PRECISIONS (InputError when unknown)."""
    if precision is None or precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return check_precision(precision)


def check_precision(precision: str) -> str:
    """`precision` when it is one of PRECISIONS, else an InputError naming it."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str):
    """The context manager that runs a forward pass in `precision` on `device` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


def memory_budget(device: torch.device, gib: Optional[float] = None) -> Optional[int]:
    """Bytes of device memory a task's feature rows may occupy: `gib` GiB when given, else half of what is free now
    (memory the caching allocator holds but does not use counts as free). None on the CPU (rows stay memory-mapped)."""
    if device.type != "cuda":
        return None
    if gib is not None:
        return int(gib * 2**30)
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return (free + cached) // 2
