"""The learner interface every method implements, and the pieces methods share.

The runner calls, for each task t: `begin_task(TaskInfo)` (the new classes' names and text features), `fit_task(TaskData)`
(the task's training features, nothing else), `end_task(TaskData)`, then `predict(FeatureBatch)` on test batches of all classes
seen so far. A learner never sees the store: what it gets is exactly what the protocol allows it to see.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

import numpy as np
import torch

from spacil.config import Config, TrainConfig
from spacil.devices import device_thread
from spacil.store.format import rows_as_tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearnerContext:
    """What every learner may know from the start: shapes and the frozen backbone's constants, never data."""

    dim: int
    num_patches: int
    logit_scale: float
    device: torch.device
    progress: bool = False  # show a progress bar over training steps
    # the pre-projection extension: z's width and visual.proj [width, d] float32 on the CPU (None in a store without it)
    width: Optional[int] = None
    visual_proj: Optional[torch.Tensor] = None
    # the model's own logit bias (SigLIP; 0 for CLIP), added to every image-text logit: it shifts all classes alike, so
    # it changes no prediction nor softmax, only the logits explain shows (docs/backbones.md)
    logit_bias: float = 0.0

    def with_bias(self, logits: torch.Tensor) -> torch.Tensor:
        """logits + the model's logit bias (the tensor itself when there is none, so a CLIP's logits keep their bits)."""
        return logits + self.logit_bias if self.logit_bias else logits


@dataclass(frozen=True)
class TaskInfo:
    """The new classes of task `task` and their text features (positions are indices in the class order).

    prompts [n_new, d]; descriptions [n_new, M, d] with mask [n_new, M] (None when the store has none);
    templates [n_new, K, d] (per-template prompt tokens, None when the store has none).
    """

    task: int
    positions: list[int]
    names: list[str]
    prompts: Optional[torch.Tensor]
    descriptions: Optional[torch.Tensor]
    description_mask: Optional[torch.Tensor]
    templates: Optional[torch.Tensor]
    # template_norms [n_new, K]: the per-template features' norms before normalisation (None when the store has none);
    # pairwise [S, S, M, d]: the un-normalised pairwise descriptions among every class seen so far (this task's included),
    # seen order on both axes, with pairwise_counts [S, S] real slots per pair (None when the store has none)
    template_norms: Optional[torch.Tensor] = None
    pairwise: Optional[torch.Tensor] = None
    pairwise_counts: Optional[torch.Tensor] = None
    # area_texts: AREA's description sets and prompts of the new classes, {set: (un-normalised features [n_new, M, d],
    # real sentences per class [n_new])} (store/area_texts.py); None unless the learner declares "area_texts" in
    # `text_inputs` and the store has them
    area_texts: Optional[dict] = None


@dataclass
class FeatureBatch:
    """global_ [B, d] float32, patches [B, N, d] float32 (None for global-only methods), targets [B] class positions;
    extra: the further per-row arrays the learner declared (`Learner.train_arrays` / `eval_arrays`), name -> float32
    [B, ...], e.g. "global_pre" -> z [B, width]."""

    global_: torch.Tensor
    patches: Optional[torch.Tensor]
    targets: Optional[torch.Tensor] = None
    rows: Optional[np.ndarray] = None  # row numbers inside the task, for per-image deterministic choices
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class TaskData:
    """The features of one task (training rows, or the test rows of an evaluation); `take` and `batches` yield float32
    tensors on `device`.

    Where the rows live between batches (`placement`):
    - "host": read from the memory maps batch by batch (the CPU: nothing is copied that a batch does not use);
    - "resident": copied to the device once, in the store's dtype (fp16 in practice), and converted to float32 per batch
      there (a GPU, when the rows fit in `memory_budget` bytes);
    - "stream": a background thread reads the next batches into (pinned, on CUDA) host memory while the device works on the
      current one: double buffering, for rows beyond the budget.
    The default, "auto", is "host" on the CPU, else "resident" within the budget and "stream" beyond it (decided per array:
    global rows first, then the extra arrays, patch tokens when they also fit). An upload that runs out of device memory
    all the same (other processes on the GPU) is given up: that array and the ones after it stream.

    `extra`: further per-row arrays (name -> [n, ...], rows on axis 0, e.g. "global_pre" -> z [n, width]), read, uploaded
    or streamed exactly like the global rows and handed over in `FeatureBatch.extra` in every batch.
    """

    PLACEMENTS = ("auto", "host", "resident", "stream")

    def __init__(self, task: int, global_: np.ndarray, patches: Optional[np.ndarray], targets: np.ndarray, device: torch.device,
                 memory_budget: Optional[int] = None, placement: str = "auto", extra: Optional[Mapping[str, np.ndarray]] = None):
        if placement not in self.PLACEMENTS:
            raise ValueError(f"placement {placement!r}: expected one of {self.PLACEMENTS}")
        self.task = task
        self._global = global_
        self._patches = patches
        self._extra = dict(extra or {})
        for name, array in self._extra.items():
            if name in ("global", "patches", "targets") or len(array) != len(targets):
                raise ValueError(f"extra array {name!r}: a reserved name, or {len(array)} rows for {len(targets)} targets")
        self.targets = targets
        self.device = torch.device(device)
        self.memory_budget = memory_budget
        if placement == "auto":
            placement = "host" if self.device.type == "cpu" else "resident"
        self.placement = placement
        self._resident: dict[str, torch.Tensor] = {}  # uploaded arrays: "global", "patches", "targets"
        self._resident_bytes = 0

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def has_patches(self) -> bool:
        return self._patches is not None

    @property
    def extra_names(self) -> tuple[str, ...]:
        return tuple(self._extra)

    # placement ---------------------------------------------------------------------------------------------------------
    def _arrays(self, with_patches: bool) -> dict[str, object]:
        arrays = {"global": self._global, **self._extra}
        if with_patches and self._patches is not None:
            arrays["patches"] = self._patches
        return arrays

    def _upload(self, with_patches: bool) -> None:
        """Copy to the device, once, every needed array that fits in what is left of the budget (resident placement)."""
        if self.placement != "resident":
            return
        if "targets" not in self._resident:
            self._resident["targets"] = torch.from_numpy(np.asarray(self.targets, dtype=np.int64)).to(self.device)
        for name, array in self._arrays(with_patches).items():
            if name in self._resident:
                continue
            size = _array_bytes(array, len(self))
            if self.memory_budget is not None and self._resident_bytes + size > self.memory_budget:
                continue  # streamed instead
            try:
                self._resident[name] = _copy_rows_to_device(array, len(self), self.device)
            except torch.cuda.OutOfMemoryError:
                log.warning("task %d: %s rows (%.1f GiB) did not fit on %s; streaming them instead", self.task + 1, name,
                            size / 2**30, self.device)
                self.memory_budget = self._resident_bytes  # nothing more is uploaded for this task
                continue
            self._resident_bytes += size

    def _streamed(self, with_patches: bool) -> list[str]:
        """Names of the needed arrays that are read from the host per batch."""
        return [name for name in self._arrays(with_patches) if name not in self._resident]

    # reading -----------------------------------------------------------------------------------------------------------
    def take(self, rows: np.ndarray, with_patches: bool = True) -> FeatureBatch:
        rows = np.sort(rows)  # sequential reads from the memory map
        self._upload(with_patches)
        index = None
        if self._resident:
            index = torch.from_numpy(rows).to(self.device)
        return self._assemble(rows, index, with_patches, {})

    def _assemble(self, rows: np.ndarray, index: Optional[torch.Tensor], with_patches: bool,
                  host: dict[str, torch.Tensor]) -> FeatureBatch:
        """One batch from the resident arrays (gathered at `index` on the device) and from host rows (read here, unless
        already read into `host` by the streaming thread)."""
        tensors = {}
        for name, array in self._arrays(with_patches).items():
            if name in self._resident:
                tensors[name] = self._resident[name][index].float()
            elif name in host:
                tensors[name] = host[name].to(self.device, non_blocking=True).float()
            else:
                tensors[name] = rows_as_tensor(array, rows, self.device)
        if "targets" in self._resident:
            targets = self._resident["targets"][index]
        elif "targets" in host:
            targets = host["targets"].to(self.device, non_blocking=True)
        else:
            targets = torch.from_numpy(self.targets[rows]).to(self.device)
        extra = {name: tensors[name] for name in self._extra}
        return FeatureBatch(tensors["global"], tensors.get("patches"), targets, rows, extra)

    def batches(self, batch_size: int, generator: Optional[torch.Generator] = None, with_patches: bool = True) -> Iterator[FeatureBatch]:
        """Shuffled batches when a (CPU) generator is given, in order otherwise. The order is drawn on the CPU, so a run's
        batches are the same on every device."""
        n = len(self)
        order = torch.randperm(n, generator=generator).numpy() if generator is not None else np.arange(n)
        if self.placement == "host":
            for start in range(0, n, batch_size):
                yield self.take(order[start:start + batch_size], with_patches)
            return
        self._upload(with_patches)
        streamed = self._streamed(with_patches)
        # the whole order goes to the device once per pass (a small copy per batch would wait for the device each time)
        device_order = torch.from_numpy(order).to(self.device) if self._resident else None
        starts = range(0, n, batch_size)
        if not streamed:
            for start in starts:
                rows = np.sort(order[start:start + batch_size])
                index = device_order[start:start + batch_size].sort().values
                yield self._assemble(rows, index, with_patches, {})
            return
        arrays = {name: array for name, array in self._arrays(with_patches).items() if name in streamed}
        if "targets" not in self._resident:
            arrays["targets"] = self.targets
        for start, host in _prefetched(arrays, order, batch_size, self.device):
            rows = np.sort(order[start:start + batch_size])
            index = device_order[start:start + batch_size].sort().values if device_order is not None else None
            yield self._assemble(rows, index, with_patches, host)


def _array_bytes(array, rows: int) -> int:
    """Bytes of `rows` rows of a (memory-mapped or lazily viewed) array."""
    return rows * int(np.prod(array.shape[1:], dtype=np.int64)) * np.dtype(array.dtype).itemsize


_UPLOAD_CHUNK_BYTES = 64 << 20  # host rows read per copy while uploading an array to the device


def _copy_rows_to_device(array, rows: int, device: torch.device) -> torch.Tensor:
    """All `rows` rows of `array` -> one tensor on `device` in the array's own dtype, read and copied chunk by chunk (pinned
    chunks on CUDA, so reading the next chunk overlaps copying this one)."""
    dtype = torch.from_numpy(np.zeros(0, dtype=array.dtype)).dtype
    target = torch.empty((rows, *array.shape[1:]), dtype=dtype, device=device)
    step = max(1, _UPLOAD_CHUNK_BYTES // max(1, _array_bytes(array, 1)))
    pin = device.type == "cuda"
    for start in range(0, rows, step):
        chunk = torch.from_numpy(np.ascontiguousarray(array[start:start + step]))
        if pin:
            chunk = chunk.pin_memory()
        target[start:start + len(chunk)].copy_(chunk, non_blocking=pin)
    return target


def _prefetched(arrays: dict, order: np.ndarray, batch_size: int,
                device: torch.device) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(start, {name: host rows of the batch at `start`}) in order, read by a background thread at most two batches ahead
    (pinned for `device` when it is a GPU; the thread has it as its current device)."""
    import queue
    import threading

    pin = device.type == "cuda"
    slots: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for start in range(0, len(order), batch_size):
                rows = np.sort(order[start:start + batch_size])
                host = {}
                for name, array in arrays.items():
                    tensor = torch.from_numpy(np.ascontiguousarray(array[rows]))
                    host[name] = tensor.pin_memory() if pin else tensor
                if not put((start, host)):
                    return
            put(None)
        except BaseException as err:  # handed to the consumer, which raises it
            put(err)

    thread = device_thread(device, read, "spacil-prefetch")
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class Learner:
    """Base class of a class-incremental method. Subclasses set `name` and override the hooks they need."""

    name = "base"
    needs_patches = False  # whether the runner must read patch tokens for this method
    # Attributes kept on the CPU by design, whatever the run's device (everything else lives on `context.device`):
    # load_state_dict puts them there too (checkpoints load to the CPU, and each learner places its own state).
    kept_on_host: tuple[str, ...] = ()
    # further per-row store arrays this method reads (e.g. "global_pre": z), in training and in evaluation; the runner
    # checks the store has them (a one-line error saying how to add them) and hands them over in FeatureBatch.extra
    train_arrays: tuple[str, ...] = ()
    eval_arrays: tuple[str, ...] = ()
    # store text inputs beyond prompts/templates/descriptions/pairwise that this method reads (e.g. "area_texts"); the
    # runner refuses a store without them before the run folder is written (store.rows.require_text_inputs)
    text_inputs: tuple[str, ...] = ()

    def __init__(self, config: Config, context: LearnerContext):
        self.config = config
        self.context = context
        self.seen_positions: list[int] = []
        self.seen_names: list[str] = []

    @property
    def label(self) -> str:
        """How this run is named in tables and plots."""
        return self.name

    def cpu_work_elements(self) -> int:
        """Numbers per image in the largest tensor this learner computes with (patch tokens x d with patches, else d):
        spacil.devices.cpu_threads picks the CPU threads of a run from it."""
        ctx = self.context
        return ctx.dim * (ctx.num_patches if self.needs_patches else 1)

    # hooks -------------------------------------------------------------------------------------------------------------
    def cost_note(self, train_rows: list[int], task_sizes: list[int]) -> Optional[str]:
        """One line the runner shows before the run starts, for a method whose cost a user should see first (the
        training rows and the classes of each task), or None (the default)."""
        return None

    def begin_task(self, info: TaskInfo) -> None:
        self.seen_positions.extend(info.positions)
        self.seen_names.extend(info.names)

    def fit_task(self, data: TaskData) -> None:
        """Train on the current task (default: nothing to train)."""

    def end_task(self, data: TaskData) -> None:
        """Whatever must be kept after the task (statistics, prototypes)."""

    def logits(self, batch: FeatureBatch) -> torch.Tensor:
        """[B, seen classes] scores, columns in the order of `seen_positions`."""
        raise NotImplementedError

    def columns_of_positions(self) -> torch.Tensor:
        """[max seen position + 1] -> the logit column of each seen class position (-1 for unseen), to turn targets into
        cross-entropy labels."""
        column = torch.full((max(self.seen_positions) + 1,), -1, dtype=torch.long)
        column[torch.tensor(self.seen_positions)] = torch.arange(len(self.seen_positions))
        return column

    @torch.no_grad()
    def predict(self, batch: FeatureBatch) -> torch.Tensor:
        """[B] predicted class positions."""
        columns = torch.as_tensor(self.seen_positions, device=batch.global_.device)
        return columns[self.logits(batch).argmax(dim=1)]

    # checkpointing -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seen_positions": list(self.seen_positions), "seen_names": list(self.seen_names)}

    def load_state_dict(self, state: dict) -> None:
        self.seen_positions = list(state["seen_positions"])
        self.seen_names = list(state["seen_names"])


def class_sums(features: torch.Tensor, columns: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of rows, the same bits on every device: features [n, d], columns [n] in [0, num_classes) ->
    (sums [num_classes, d], counts [num_classes]), float64.

    A one-hot matrix product in float64, where `index_add_` would use atomics on CUDA (an order of additions that changes
    from run to run): a matrix product adds in the same order every time on a given device, and float64 keeps the
    rounding of any order far below float32's, so the sums rounded to float32 are the CPU's on every device too (but for a
    tie at a float32 rounding boundary, about one entry in 2^29)."""
    one_hot = torch.nn.functional.one_hot(columns, num_classes).to(torch.float64)  # [n, C]
    return one_hot.T @ features.to(torch.float64), one_hot.sum(dim=0)


def task_generator(config: Config, task: int, stream: int = 0, device: Optional[torch.device] = None) -> torch.Generator:
    """The one source of randomness of a task: derived from the config's seed, the task and a stream number, so a resumed
    run draws exactly what an uninterrupted one draws. `device` places the generator (CPU by default): draws on a CUDA
    generator are reproducible run to run, but differ from the CPU's."""
    generator = torch.Generator(device=device if device is not None else "cpu")
    generator.manual_seed(config.seed * 1_000_003 + task * 101 + stream)
    return generator


def make_optimizer(params: list[torch.nn.Parameter], train: TrainConfig, total_steps: int):
    """The SPEC.md defaults: SGD with momentum, weight decay, cosine schedule over the task's steps."""
    if train.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    if train.schedule == "cosine":
        scale = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))  # noqa: E731
    else:
        scale = lambda step: 1.0  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, scale)


def steps_per_task(num_samples: int, train: TrainConfig) -> int:
    return math.ceil(num_samples / train.batch_size) * train.epochs


def step_bar(context: LearnerContext, total: int, task: int):
    """A progress bar over the training steps of one task (silent unless the context asks for it)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=f"task {task + 1} training", unit="step", leave=False, disable=not context.progress)
