"""Where tensors live and in which precision the frozen encoders run: decided here, once, and passed down.

`--device auto|cpu|cuda|cuda:N` (and `device:` in a config) resolve through `resolve_device`; extraction precision
`fp32|bf16|fp16` through `resolve_precision`. Everything else receives a `torch.device` and never decides on its own.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Optional

import torch

from spacil.errors import InputError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
# Set by `spacil sweep` in each worker's environment: how many of its workers share this process's GPU.
PROCESSES_PER_GPU_ENV = "SPACIL_PROCESSES_PER_GPU"
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
    """Bytes of device memory a task's feature rows may occupy: `gib` GiB when given, else half of this process's share of
    the GPU, and never more than half of what is free now (memory the caching allocator holds but does not use counts as
    free). The share is the GPU's memory divided by the processes sharing it (`SPACIL_PROCESSES_PER_GPU`, which
    `spacil sweep --jobs N` sets): workers that start together all see the GPU empty, and half of what is free for each
    would add up to more than there is. None on the CPU (rows stay memory-mapped)."""
    if device.type != "cuda":
        return None
    if gib is not None:
        return int(gib * 2**30)
    return _half_free_share(device)


def _half_free_share(device: torch.device) -> int:
    """Half of this process's share of the GPU's memory, never more than half of what is free now (CUDA only)."""
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return min(free + cached, total // processes_per_gpu()) // 2


# On the CPU the working memory of one chunk of scoring is at most this much: larger chunks are no faster there (the
# transport solver works on cache-sized blocks anyway, docs/benchmarks/scale.md), and a fixed size keeps the chunks, so
# the float rounding of a run, the same on every machine with memory to spare.
CPU_WORKING_BYTES = 1 << 30
# One chunk of scoring may always use this much, whatever the budget: `device_memory_budget=0` means "stream every row",
# and read as a chunk size it gave chunks of one sample and one class, which made a 60-class GPU run 20 times slower
# (37 s -> 14 min) without saving memory that matters (a chunk of 64 MiB is small beside the model and the rows).
MIN_WORKING_BYTES = 64 << 20


def working_memory(device: torch.device, gib: Optional[float] = None) -> int:
    """Bytes one chunk of scoring (SPA's patch branch: relevance, selection, transport, and in training what the backward
    pass keeps) may occupy on `device`: the one budget of scoring, training and evaluation. `gib` GiB when given (the
    `train.device_memory_budget` knob, which also bounds a task's resident rows); else on a GPU the figure `memory_budget`
    gives the rows (half of what is free: rows and a chunk together stay within what was free), and on the CPU half of
    the memory available now, at most CPU_WORKING_BYTES. Never below MIN_WORKING_BYTES."""
    if gib is not None:
        figure = int(gib * 2**30)
    elif device.type == "cuda":
        figure = _half_free_share(device)
    else:
        figure = min(_available_host_bytes() // 2, CPU_WORKING_BYTES)
    return max(figure, MIN_WORKING_BYTES)


def _available_host_bytes() -> int:
    """The host memory available to new allocations (Linux's MemAvailable; the physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def processes_per_gpu() -> int:
    """The processes that share this one's GPU (the environment's SPACIL_PROCESSES_PER_GPU; 1 when unset)."""
    value = os.environ.get(PROCESSES_PER_GPU_ENV, "1")
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise InputError(f"environment variable {PROCESSES_PER_GPU_ENV}={value!r}: expected a whole number of at least 1")
    return count


def use_device(device: torch.device) -> None:
    """Make `device` this thread's current CUDA device (nothing on the CPU). The current device is what pinned memory,
    events and streams without an explicit device refer to; it is per thread and starts at GPU 0."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def device_thread(device: torch.device, target: Callable[[], None], name: str) -> threading.Thread:
    """A daemon thread (not started) that runs `target` with `device` as its current CUDA device. A thread that pins
    memory or waits on a CUDA event without setting it would use GPU 0, and open a context there, whatever the run's GPU.
    For 'cuda' without an index the creating thread's current device is taken, here, before the thread starts."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    def run() -> None:
        use_device(device)
        target()

    return threading.Thread(target=run, name=name, daemon=True)


def local_rank_device(local_rank: int) -> torch.device:
    """The GPU of local rank `local_rank` of a distributed job: cuda:LOCAL_RANK when this process sees every GPU of the
    node, cuda:0 when the launcher shows each rank only its own (SLURM --gpus-per-task=1, a per-rank CUDA_VISIBLE_DEVICES);
    InputError when neither fits."""
    count = torch.cuda.device_count()
    if 0 <= local_rank < count:
        return torch.device("cuda", local_rank)
    if count == 1:
        return torch.device("cuda", 0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    raise InputError(f"LOCAL_RANK={local_rank}: this process sees {count} CUDA device(s){shown}; expected every GPU of the "
                     f"node (LOCAL_RANK < {count}) or exactly one per rank")


# CPU threads ----------------------------------------------------------------------------------------------------------
# Measured in docs/benchmarks/threads.md (benchmarks/bench_threads.py): on 2 cores, small tensors (the demo world's 49
# patches x 64 dims, the tests' stores) run no slower on one thread than on two, and two threads collapse beside other
# CPU-bound processes (OpenMP's threads wait for each other at every parallel region: SPA's demo run took 64 s instead
# of 18 s, issue 26); large ones (ViT-B/16's 196 x 512 per image, the image encoder during extraction) gain from every
# core on a quiet machine and lose far less than small ones beside busy processes. The choice depends on the work and the
# machine's cores only, never on its load at the moment: a resumed run or extraction computes with the same threads as an
# uninterrupted one (results are reproducible bit for bit on one machine).
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Per-image tensor size (patch tokens x width) from which more threads pay: between the demo world's 3,136 (one thread
# as fast) and ViT-B/16's 100,352 (two threads 1.7x faster on a quiet machine, issue 26).
LARGE_WORK_ELEMENTS = 25_088  # ViT-B/32's 49 patches x 512
# Set by `spacil sweep --jobs N` in each worker's environment: the cores it may use (cores // N).
CPU_SHARE_ENV = "SPACIL_CPU_SHARE"


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (os.cpu_count where there is none), at most the share a sweep
    gave it (SPACIL_CPU_SHARE)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    share = os.environ.get(CPU_SHARE_ENV, "").strip()
    if share:
        if not share.isdigit() or int(share) < 1:
            raise InputError(f"environment variable {CPU_SHARE_ENV}={share!r}: expected a whole number of at least 1")
        cores = min(cores, int(share))
    return cores


def threads_set_by_user() -> Optional[str]:
    """What already fixed the CPU threads, or None: OMP_NUM_THREADS / MKL_NUM_THREADS in the environment, or a
    torch.set_num_threads call (seen as a thread count other than torch's defaults, `torch_default_threads`)."""
    for name in THREAD_ENV:
        if os.environ.get(name, "").strip():
            return f"{name}={os.environ[name].strip()}"
    if torch.get_num_threads() not in torch_default_threads():
        return f"torch.set_num_threads({torch.get_num_threads()})"
    return None


def torch_default_threads() -> set[int]:
    """The counts torch may start with when nothing sets them: one thread per usable core, per CPU, or per physical core
    (builds differ). A caller's torch.set_num_threads to one of these cannot be told apart from the default."""
    try:
        counts = {len(os.sched_getaffinity(0)), os.cpu_count() or 1}
    except AttributeError:  # not Linux
        counts = {os.cpu_count() or 1}
    try:  # physical cores: the distinct sibling groups of the CPUs (Linux)
        from pathlib import Path

        groups = {Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
                  for cpu in range(os.cpu_count() or 1)}
        counts.add(len(groups))
    except OSError:
        pass
    return counts


def choose_cpu_threads(elements_per_image: int, cores: Optional[int] = None) -> int:
    """The intra-op threads for work whose per-image tensors hold `elements_per_image` numbers (patch tokens x width):
    one for small work, every usable core (`usable_cores`, or `cores`) for large work."""
    if elements_per_image < LARGE_WORK_ELEMENTS:
        return 1
    return usable_cores() if cores is None else cores


@contextlib.contextmanager
def cpu_threads(elements_per_image: int):
    """Run the block with the CPU threads `choose_cpu_threads` picks, and put the previous count back after it, unless the
    user fixed them (`threads_set_by_user`): then nothing changes. Entry points (a run, an extraction's encoding) wrap
    their work in it; yields the thread count in force."""
    if threads_set_by_user() is not None:
        yield torch.get_num_threads()
        return
    before = torch.get_num_threads()
    chosen = choose_cpu_threads(elements_per_image)
    torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        torch.set_num_threads(before)
