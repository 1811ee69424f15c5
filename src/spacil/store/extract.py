"""`spacil extract`: encode a data set once with the frozen CLIP into a feature store (resumable, shardable).

A split's rows are cut into fixed batches (rows [b * batch_size, (b + 1) * batch_size)) and written in place into `.npy`
files allocated at their final size. What is on disk is described by records that are written in a fixed order, so that
a kill at any instant (SIGKILL included) leaves a folder the next run completes byte-identically:

1. `.progress.json` (the store record: settings fingerprint, devices) is written first, before any other file; whether an
   extraction is new or resumed is decided by it alone (a folder with nothing but interrupted temporary files is new).
2. A split whose `image_paths.json` names other images than the tree now has (a broken file removed since) loses its
   rows from every rank record. For every split with no row recorded done, the maps `global.npy`, `patches.npy` and
   `global_pre.npy` (z, unless `--no-pre-projection`) are (re-)created, then `labels.npy`, then `image_paths.json` are
   saved: labels and image paths are on disk before any row.
3. Each process ("rank") appends the rows it has written *and flushed* to its own `.progress.rank<R>.json`
   (`{"done": {split: [[start, end], ...]}}`, row ranges); a batch counts as done only once it is there.
4. Text features (and `backbone/visual_proj.npy` with z), then `meta.json` are written when every batch is recorded
   done; then the records are removed (`.progress.json` first).

A finished store without z has it added by the same command: the images are encoded again, but only `global_pre.npy` is
(re-)created and written, by the same steps 1-4 (the record's fingerprint names the arrays written: `["global_pre"]`).
Readers see z only once `meta.json` names its `width` (written last), so the store stays readable throughout, and the
finished store is the bytes an extraction with z from the start would have written (same batch size, device kind and
precision).

A rerun takes the union of all rank records, and hands the batches not yet done out again; the forward pass of a batch is
deterministic, so the finished store is the same bytes as an uninterrupted one.

Under `torchrun` (env RANK / WORLD_SIZE / LOCAL_RANK) the ranks share the work: rank 0 creates the files, all ranks agree
on the batches not yet done (in batch order, train then test) and rank r takes the r-th of `world` contiguous, near-equal
slices of that list, writing into the same files; rank 0 writes text features and `meta.json` after a final barrier. A
rerun may use another world size: the records are rows, not ranks.

On CUDA, a batch's images come as uint8 from pinned memory with non-blocking copies and are normalised on the device, the
forward pass runs under autocast (`--precision`, bf16 by default), outputs are cast to the store dtype on the device and
copied back into pinned buffers, and a writer thread puts batch i on disk while the device runs batch i+1.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm import tqdm

from spacil.backbone import FrozenCLIP
from spacil.backbone import Preprocess
from spacil.data import DatasetIndex, DatasetSpec, SplitIndex, index_dataset, normalise_name
from spacil.data.store_size import StoreShape, estimate_store, room_line
from spacil.devices import cpu_threads, device_thread, local_rank_device, resolve_device, resolve_precision
from spacil import __version__
from spacil.errors import InputError
from spacil.store.format import (FORMAT, IMAGE_PATHS_FILE, PROGRESS_FILE, SPLITS, VERSION, pad_token_sets, read_image_paths,
                                 read_npy_header, write_text_features, write_visual_proj)
from spacil.fileio import atomic_save_npy, atomic_write_text, make_dirs, read_json, writing
from spacil.recorded_paths import relative_to

log = logging.getLogger(__name__)

RANK_PROGRESS_GLOB = ".progress.rank*.json"
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_PINNED_SLOTS = 3  # host buffers in flight on CUDA: one being filled, one queued, one being written


def rank_progress_file(rank: int) -> str:
    """The record of the rows rank `rank` has written and flushed."""
    return f".progress.rank{rank}.json"


def resize_to_uint8(transform):
    """`image_transform`'s resize and crop, ending in a uint8 tensor [3, H, W] (its ToTensor and Normalize: `_Normalise`)."""
    from torchvision import transforms

    return transforms.Compose([*transform.transforms[:2], transforms.PILToTensor()])


class _ImageRows(torch.utils.data.Dataset):
    """Images of one split as uint8 tensors [3, H, W], resized and cropped by `image_transform`'s first two steps; its
    ToTensor and Normalize run batched on the encoding device (`_Normalise`): a quarter of the bytes to pin and copy, and
    20-35% less work per image for the loader workers (docs/benchmarks/extract_loader.md). A broken image yields its path as an error string, so that the main
    process can stop with one clear line whatever the number of loader workers."""

    def __init__(self, split: SplitIndex, transform):
        self.split = split
        self.resize = resize_to_uint8(transform)
        self.size = transform.transforms[1].size

    def __len__(self) -> int:
        return len(self.split.items)

    def __getitem__(self, index: int):
        item = self.split.items[index]
        try:
            return self.resize(self.split.loader(item)), ""
        except Exception as err:  # noqa: BLE001 - any decoding failure is reported by path
            return torch.zeros(3, *self.size, dtype=torch.uint8), f"{item}: unreadable image ({type(err).__name__}: {err})"


class _Normalise:
    """uint8 [B, 3, H, W] -> the encoder's input on `device`: torchvision's ToTensor then Normalize with the model's own
    statistics (`preprocess`), the same float32 operations in the same order, so the same values. The statistics are put
    on the device once (a copy from pageable memory per batch could wait for the device)."""

    def __init__(self, device: torch.device, preprocess: Preprocess = Preprocess()):
        self.device = device
        self.mean, self.std = preprocess.statistics(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True).to(torch.float32).div(255).sub_(self.mean).div_(self.std)


def encode_pil_images(backbone: FrozenCLIP, images: Sequence, dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """PIL images -> (g [B, d], P [B, N, d]) float32 on the backbone's device, as extraction writes a store's rows: the same
    resize, crop and normalisation, the backbone's precision, rounded to the store's `dtype`."""
    resize = resize_to_uint8(backbone.preprocess.transform())
    batch = torch.stack([resize(image.convert("RGB")) for image in images])
    global_, patches = backbone.encode_images(_Normalise(backbone.device, backbone.preprocess)(batch))
    cast = _TORCH_DTYPES[dtype]
    return global_.to(cast).float(), patches.to(cast).float()


def class_prompt_features(backbone: FrozenCLIP, names: list[str], templates: tuple[str, ...]
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (t_c [C, d]: normalised mean over templates, per-template tokens [C, K, d], their norms before normalisation
    [C, K]: tokens * norms[..., None] are the un-normalised text features)."""
    texts = [template.format(name) for name in names for template in templates]
    tokens, norms = backbone.encode_texts_with_norms(texts)
    tokens = tokens.reshape(len(names), len(templates), -1)
    prompts = torch.nn.functional.normalize(tokens.mean(dim=1), dim=-1)
    return (prompts.cpu().numpy().astype(np.float32), tokens.cpu().numpy().astype(np.float32),
            norms.reshape(len(names), len(templates)).cpu().numpy().astype(np.float32))


def semantic_token_features(
    backbone: FrozenCLIP, names: list[str], descriptions: dict[str, list[str]], semantic_tokens: str = "sentence"
) -> tuple[np.ndarray, np.ndarray]:
    """Descriptions per class -> semantic tokens ([C, M, d], mask [C, M]) in class index order.

    `sentence`: one token e(description) per description; `word`: every word token of every description.
    """

    by_name = {normalise_name(n): sentences for n, sentences in descriptions.items()}
    missing = [name for name in names if not by_name.get(normalise_name(name))]
    if len(missing) == len(names):
        raise InputError(f"descriptions: none of their class names matches a class of the data set (e.g. '{names[0]}')")
    if missing:
        warnings.warn(f"descriptions: {len(missing)} of {len(names)} classes have none (first: '{missing[0]}'); "
                      f"their patch score is 0", stacklevel=2)
    sets = []
    for name in names:
        sentences = by_name.get(normalise_name(name), [])
        if not sentences:
            sets.append(np.zeros((0, backbone.dim), dtype=np.float32))
        elif semantic_tokens == "word":
            sets.append(torch.cat(backbone.encode_text_tokens(sentences)).cpu().numpy())
        else:
            sets.append(backbone.encode_texts(sentences).cpu().numpy())
    return pad_token_sets(sets, backbone.dim)


def _fingerprint(spec: DatasetSpec, backbone: FrozenCLIP, counts: dict, dtype: str, batch_size: int, precision: str,
                 arrays: list) -> dict:
    return {"dataset": spec.key, "backbone": backbone.info.to_dict(), "counts": counts, "dtype": dtype,
            "batch_size": batch_size, "precision": precision, "arrays": arrays}


# ----------------------------------------------------------------------------------------------------------------------
# The file operations a kill can interrupt (tests inject kills here)


def _write_rows(fd: int, offset: int, data: memoryview) -> None:
    """Write all of `data` at `offset` of the open file `fd`."""
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _flush(fd: int) -> None:
    """Rows written so far are on disk."""
    getattr(os, "fdatasync", os.fsync)(fd)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------------
# Row ranges: which rows are recorded done


def _add_range(ranges: list, start: int, end: int) -> list:
    """Sorted, merged [start, end) ranges with [start, end) added."""
    merged = []
    for lo, hi in sorted([*ranges, [start, end]]):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return merged


def _covered(ranges: list, start: int, end: int) -> bool:
    return any(lo <= start and end <= hi for lo, hi in ranges)


def _read_done(out: Path) -> dict[str, list]:
    """The union of the rows every rank has recorded done: {split: [[start, end], ...]}."""
    done: dict[str, list] = {split: [] for split in SPLITS}
    for record in sorted(out.glob(RANK_PROGRESS_GLOB)):
        for split, ranges in read_json(record).get("done", {}).items():
            for lo, hi in ranges:
                done[split] = _add_range(done[split], int(lo), int(hi))
    return done


def _batches(counts: dict, batch_size: int) -> list[tuple[str, int, int]]:
    """Every batch of the store in order: (split, first row, end row)."""
    return [(split, start, min(counts[split], start + batch_size))
            for split in SPLITS for start in range(0, counts[split], batch_size)]


# ----------------------------------------------------------------------------------------------------------------------
# Processes: one, or the ranks of a torch.distributed job


@dataclass
class _World:
    rank: int = 0
    size: int = 1
    local_size: int = 1
    barrier_device_ids: Optional[list] = None
    owns_group: bool = False

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier(device_ids=self.barrier_device_ids) if self.barrier_device_ids else dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r}: expected an integer") from None


def _join_world(device: str | torch.device) -> tuple[_World, torch.device]:
    """The processes of this extraction and the device this one encodes on.

    A torch.distributed job (an initialised process group, or WORLD_SIZE > 1 as torchrun sets it) makes one rank per
    process; on CUDA each rank uses cuda:LOCAL_RANK (cuda:0 when the launcher shows each rank one GPU), with NCCL, on the
    CPU gloo."""
    import torch.distributed as dist

    resolved = resolve_device(str(device))
    initialised = dist.is_available() and dist.is_initialized()
    size = dist.get_world_size() if initialised else _env_int("WORLD_SIZE", 1)
    if resolved.type == "cuda":
        # one GPU per rank; the current device set, so that streams, events and pinned copies all refer to it
        if size > 1:
            resolved = local_rank_device(_env_int("LOCAL_RANK", 0))
        elif resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(resolved)
    if size <= 1:
        return _World(), resolved
    if not initialised:
        # generous: ranks wait at the final barrier for the slowest share
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    world = _World(rank=dist.get_rank(), size=dist.get_world_size(), local_size=_env_int("LOCAL_WORLD_SIZE", 1),
                   owns_group=not initialised)
    if dist.get_backend() == "nccl":
        world.barrier_device_ids = [resolved.index]
    return world, resolved


def _default_workers(device: torch.device, world: _World) -> int:
    """On CUDA the machine's cores (shared by the ranks of this node, one left for the main process); on the CPU the
    encoder needs the cores itself, so images are decoded in the main process."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, world.local_size) - 1)


# ----------------------------------------------------------------------------------------------------------------------
# From the device to the disk


@dataclass
class _Staged:
    """One encoded batch on the host, in the store dtype: {array name: rows}, e.g. global [b, d], patches [b, N, d],
    global_pre [b, width]."""

    rows: dict
    wait: Callable[[], None] = lambda: None  # returns once the copies into the host tensors are complete
    release: Callable[[], None] = lambda: None  # gives the host buffers back for reuse


class _Staging:
    """Device outputs -> host tensors in the store dtype. On CUDA: cast on the device, non-blocking copies into a ring of
    pinned buffers, an event per batch; on the CPU: a cast. `shapes`: {array name: row shape}."""

    def __init__(self, device: torch.device, dtype: str, batch_size: int, shapes: dict):
        self.device = device
        self.dtype = _TORCH_DTYPES[dtype]
        self.shapes = {name: (batch_size, *shape) for name, shape in shapes.items()}
        self.buffers: dict[int, dict] = {}
        self.free: "queue.Queue[int]" = queue.Queue()
        for slot in range(_PINNED_SLOTS):
            self.free.put(slot)

    def stage(self, outputs: dict) -> _Staged:
        if self.device.type != "cuda":
            return _Staged({name: outputs[name].to(self.dtype).contiguous() for name in self.shapes})
        slot = self.free.get()  # blocks while every buffer is still queued or being written
        if slot not in self.buffers:
            self.buffers[slot] = {name: torch.empty(shape, dtype=self.dtype, pin_memory=True)
                                  for name, shape in self.shapes.items()}
        rows = {}
        for name, buffer in self.buffers[slot].items():
            rows[name] = buffer[: len(outputs[name])]
            rows[name].copy_(outputs[name].to(self.dtype), non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))  # the stream the copies were queued on
        return _Staged(rows, event.synchronize, lambda: self.free.put(slot))


def _data_offset(path: Path, shape: tuple, dtype: str) -> int:
    """Where the rows of the `.npy` file `path` begin; InputError when its header is not the expected array's."""
    header = read_npy_header(path)
    if header.shape != tuple(shape) or header.dtype != np.dtype(dtype) or header.fortran_order:
        raise InputError(f"{path}: shape {list(header.shape)} {header.dtype}, expected {list(shape)} {dtype}; use another --out")
    return header.offset


# The arrays of rows an extraction writes, in this order; `global_pre` (z) is the pre-projection extension.
ROW_ARRAYS = ("global", "patches", "global_pre")


@dataclass
class _SplitFiles:
    """Where the rows of one split go: {array name: (path, shape)} for the arrays this extraction writes."""

    arrays: dict
    dtype: str
    offsets: dict = field(default_factory=dict)

    @classmethod
    def of(cls, folder: Path, names: tuple, rows: int, backbone: FrozenCLIP, dtype: str) -> "_SplitFiles":
        shapes = {"global": (rows, backbone.dim), "patches": (rows, backbone.num_patches, backbone.dim),
                  "global_pre": (rows, backbone.width)}
        return cls({name: (folder / f"{name}.npy", shapes[name]) for name in names}, dtype)

    def create(self) -> None:
        for path, shape in self.arrays.values():
            with writing(path):
                array = open_memmap(path, mode="w+", dtype=self.dtype, shape=shape)
                del array  # allocated at its final size; rows are written with pwrite

    def read_offsets(self) -> None:
        for path, shape in self.arrays.values():
            self.offsets[path] = _data_offset(path, shape, self.dtype)


class _RowWriter:
    """A thread that puts staged batches into the files, flushes them, then records them done in this rank's record.

    Batches are written in the order given; the record only ever names rows that are flushed. An error in the thread is
    raised in the caller at the next `submit` or at `close`."""

    def __init__(self, files: dict[str, _SplitFiles], record: Path, done: dict, bar: Optional[tqdm], device: torch.device):
        self.files = files
        self.record = record
        self.done = done
        self.bar = bar
        self.error: Optional[BaseException] = None
        self.fds = {}
        for split_files in files.values():
            for path, _ in split_files.arrays.values():
                self.fds[path] = os.open(path, os.O_RDWR)
        self.queue: "queue.Queue" = queue.Queue(maxsize=_PINNED_SLOTS - 1)
        # the thread waits on CUDA events: with the encoding GPU as its current device, or it would open a context on GPU 0
        self.thread = device_thread(device, self._run, "spacil-extract-writer")
        self.thread.start()

    def submit(self, split: str, start: int, end: int, staged: _Staged) -> None:
        if self.error is not None:
            staged.release()
            raise self.error
        self.queue.put((split, start, end, staged))

    def close(self) -> None:
        """Write what is queued, stop the thread, close the files; raises the thread's error if it had one."""
        self.queue.put(None)
        self.thread.join()
        for fd in self.fds.values():
            os.close(fd)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            split, start, end, staged = item
            try:
                if self.error is None:
                    self._write(split, start, end, staged)
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                self.error = err
            finally:
                staged.release()

    def _write(self, split: str, start: int, end: int, staged: _Staged) -> None:
        staged.wait()
        split_files = self.files[split]
        written = []
        for name, (path, _) in split_files.arrays.items():
            array = staged.rows[name].numpy()
            offset = split_files.offsets[path] + start * array[0].nbytes
            with writing(path):  # a full disk: one line naming the file, raised in the caller's thread
                _write_rows(self.fds[path], offset, memoryview(array.reshape(-1).view(np.uint8)))
            written.append(path)
        for path in written:
            with writing(path):
                _flush(self.fds[path])
        self.done[split] = _add_range(self.done[split], start, end)
        atomic_write_text(self.record, json.dumps({"done": self.done}))
        if self.bar is not None:
            self.bar.update(end - start)


# ----------------------------------------------------------------------------------------------------------------------
# The extraction


def _has_content(out: Path) -> bool:
    """Anything in `out` besides temporary files of interrupted atomic writes (`.<name>.tmp`)?"""
    return out.is_dir() and any(not (p.name.startswith(".") and p.name.endswith(".tmp")) for p in out.iterdir())


def _choose_precision(requested: Optional[str], recorded: Optional[str], device: torch.device, where: Path) -> str:
    """The precision of this run: the one asked for, else the one the store was (being) encoded in, else the device's
    default. Asking for another one than the store's is refused: its rows and text features would mix precisions."""
    if requested in (None, "auto"):
        return recorded or resolve_precision(None, device)
    precision = resolve_precision(requested, device)
    if recorded is not None and precision != recorded:
        raise InputError(f"{where}: the store is encoded in {recorded}, --precision {precision} would mix precisions; "
                         f"run with --precision {recorded}, or choose another --out")
    return precision


def extract_store(
    dataset: str,
    data_root: str | Path,
    out: str | Path,
    model: str = "ViT-B-16",
    pretrained: Optional[str] = "laion400m_e32",
    dtype: str = "float16",
    batch_size: int = 64,
    workers: Optional[int] = None,
    device: str | torch.device = "auto",
    names_file: Optional[str] = None,
    class_names: Optional[str] = None,
    templates: Optional[str] = None,
    descriptions: Optional[dict[str, list[str]]] = None,
    descriptions_source: Optional[str] = None,
    semantic_tokens: str = "sentence",
    max_batches: Optional[int] = None,
    progress: bool = True,
    backbone: Optional[FrozenCLIP] = None,
    precision: Optional[str] = None,
    pre_projection: Optional[bool] = None,
    views: int = 0,
) -> Path:
    """Encode `dataset` into a store at `out` (or finish an interrupted one, or refresh a finished one's text features).

    `device`: auto, cpu, cuda, cuda:N (under torchrun: cuda:LOCAL_RANK). `precision`: fp32, bf16 or fp16 autocast (None:
    the store's when resuming, else bf16 on CUDA and fp32 on the CPU). `workers`: image-decoding processes (None: the
    machine's cores on CUDA, 0 on the CPU). `max_batches` stops this process after that many batches (to test resuming).
    `backbone` reuses an already built model (it must be the one `model` and `pretrained` name; its device is used).
    `class_names`: names by folder index (`--class-names`); `names_file`: only compared with the names (`--names-file`);
    `templates`: a templates file replacing the data set's. The tree is listed and its names checked (`spacil data check`
    without opening the images) before anything is built or written.
    `pre_projection`: write z (`<split>/global_pre.npy`) and `backbone/visual_proj.npy` (None: the unfinished
    extraction's choice when resuming, else yes). On a finished store without them, yes (or None) encodes the images
    again and adds only z, resumably; the other arrays are kept as they are.
    `views`: the views `spacil extract --views` adds afterwards, counted in the disk check: before its first write the
    extraction estimates what it has left to write (`spacil.data.store_size`), prints it, and stops with an InputError
    when the free space at `out` is smaller.
    """
    if dtype not in _TORCH_DTYPES:
        raise InputError(f"--dtype {dtype}: expected float16 or float32")
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: expected at least 1")
    if workers is not None and workers < 0:
        raise InputError(f"--workers {workers}: expected 0 or more")
    data = index_dataset(dataset, data_root, class_names=class_names, names_file=names_file, templates=templates)
    data.raise_first_fault()
    out = Path(out)
    world, run_device = _join_world(backbone.device if backbone is not None else device)
    try:
        return _extract(data, out, model, pretrained, dtype, batch_size, workers, run_device, world,
                        descriptions, descriptions_source, semantic_tokens, max_batches, progress, backbone, precision,
                        pre_projection, views)
    finally:
        world.close()


def _extract(data: DatasetIndex, out: Path, model, pretrained, dtype, batch_size, workers, device: torch.device,
             world: _World, descriptions, descriptions_source, semantic_tokens, max_batches, progress, backbone,
             precision, pre_projection, views=0) -> Path:
    spec, names, splits = data.spec, data.names, data.splits
    provenance = {"image_root": str(data.root), "class_names_source": data.names_source}
    progress_path = out / PROGRESS_FILE
    meta_path = out / "meta.json"
    # Everything below up to the first barrier only reads, so that every rank sees the folder as rank 0 found it.
    recorded = read_json(progress_path) if progress_path.exists() else None
    complete = recorded is None and meta_path.exists()
    old_meta = read_json(meta_path) if complete else None
    if recorded is not None:
        # spacil 0.1 encoded in fp32; before 0.3 an extraction wrote global and patches only
        recorded_fingerprint = {"precision": "fp32", "arrays": ["global", "patches"], **recorded.get("fingerprint", {})}
        precision = _choose_precision(precision, recorded_fingerprint["precision"], device, progress_path)
    elif complete:
        precision = _choose_precision(precision, old_meta.get("precision", "fp32"), device, meta_path)
    else:
        precision = _choose_precision(precision, None, device, out)
    if backbone is None:
        backbone = FrozenCLIP(model, pretrained, device, precision)
    else:
        backbone = backbone.with_precision(precision)
    counts = {split: len(splits[split].items) for split in SPLITS}
    # the arrays of rows this run writes: all of them; or only z, added to a finished store that lacks it
    if pre_projection and backbone.width is None:
        backbone.require_pre_projection()
    has_z = backbone.width is not None  # a family without z (docs/backbones.md) extracts without it
    adding = complete and pre_projection is not False and "width" not in old_meta and has_z
    if recorded is not None:
        arrays = list(recorded_fingerprint["arrays"])
        if pre_projection is False and "global_pre" in arrays:
            raise InputError(f"{progress_path}: an unfinished extraction with pre-projection features (z); resume it "
                             f"without --no-pre-projection")
        if pre_projection and "global_pre" not in arrays:
            raise InputError(f"{progress_path}: an unfinished extraction without pre-projection features (z); resume it "
                             f"as it was started, then run again to add them")
    elif adding:
        arrays = ["global_pre"]
    else:
        arrays = [name for name in ROW_ARRAYS if name != "global_pre" or (pre_projection is not False and has_z)]
    with_pre = "global_pre" in arrays or (complete and "width" in old_meta)
    fingerprint = _fingerprint(spec, backbone, counts, dtype, batch_size, precision, arrays)
    if complete:
        stored_backbone = old_meta.get("backbone", {})
        if stored_backbone != backbone.info.to_dict():
            raise InputError(f"{meta_path}: the store was encoded with another model ({stored_backbone.get('model')}, "
                             f"{stored_backbone.get('pretrained')}); its text features must come from the same one")
        stored_dtype = read_npy_header(out / "train" / "global.npy").dtype
        if stored_dtype != np.dtype(dtype):  # only text features are refreshed: the rows would keep their old dtype
            raise InputError(f"--dtype {dtype}: {out} is a complete store of {stored_dtype} rows; a complete store only has its "
                             f"text features refreshed (and z added), so extract into another --out")
        for split in SPLITS:
            stored_rows = read_npy_header(out / split / "global.npy").shape[0]
            if adding and stored_rows != counts[split]:
                raise InputError(f"{out / split / 'global.npy'}: {stored_rows} rows, the data set's {split} split has "
                                 f"{counts[split]}; z can only be added from the data the store was extracted from")
    elif recorded is not None:
        if _without_counts(recorded_fingerprint, out) != _without_counts(fingerprint, out):
            raise InputError(
                f"{progress_path}: an unfinished extraction with other settings (data set, model, dtype or batch size); "
                f"use another --out or delete {out}"
            )
    elif out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder; choose another --out")
    elif _has_content(out):
        raise InputError(f"--out {out}: folder exists and is not an unfinished extraction; choose another --out")
    _check_room(out, data, backbone, dtype, arrays if not complete or adding else [], recorded, old_meta, views,
                descriptions, semantic_tokens, show=progress and world.rank == 0)
    world.barrier()

    if complete and not adding:
        if world.rank == 0:
            log.info("%s: store complete; refreshing its text features only", out)
            _finish(out, spec, names, backbone, descriptions, descriptions_source, semantic_tokens, with_pre,
                    provenance={**provenance, **{k: old_meta[k] for k in ("precision", "device") if k in old_meta}})
        return out
    if adding:
        log.info("%s: store complete without pre-projection features; encoding the images again to add z", out)

    files = {split: _SplitFiles.of(out / split, tuple(arrays), counts[split], backbone, dtype) for split in SPLITS}
    if world.rank == 0:
        _prepare(out, recorded, fingerprint, device, files, splits)
    world.barrier()
    for split_files in files.values():
        split_files.read_offsets()
    done = _read_done(out)
    todo = [batch for batch in _batches(counts, batch_size) if not _covered(done[batch[0]], batch[1], batch[2])]
    share = todo[len(todo) * world.rank // world.size: len(todo) * (world.rank + 1) // world.size]
    world.barrier()  # every rank has its share before any rank records more rows done

    if workers is None:
        workers = _default_workers(device, world)
    # the encoder's matrix products: every core (ViT-B/16); a family without z (width None) counts its joint width
    with cpu_threads(backbone.num_patches * (backbone.width or backbone.dim)):
        _encode(out, spec, splits, files, backbone, share, world, workers, max_batches,
                progress and world.rank == 0)
    world.barrier()
    if world.rank == 0:
        done = _read_done(out)
        if all(_covered(done[split], start, end) for split, start, end in _batches(counts, batch_size)):
            devices = set(read_json(progress_path).get("devices", [device.type]))
            if meta_path.exists():  # z added to a finished store: its rows may come from other devices
                devices |= set(str(read_json(meta_path).get("device", "")).split("+")) - {""}
            _finish(out, spec, names, backbone, descriptions, descriptions_source, semantic_tokens, with_pre,
                    provenance={**provenance, "precision": precision, "device": "+".join(sorted(devices))})
    return out


def _check_room(out: Path, data: DatasetIndex, backbone: FrozenCLIP, dtype: str, arrays: list, recorded: Optional[dict],
                old_meta: Optional[dict], views: int, descriptions, semantic_tokens: str, show: bool) -> None:
    """Before the first write: print what is left to write (the rows of `arrays` no record names done, labels and paths
    of splits not begun, views not yet in the store, text) and stop with an InputError naming it and the free space at
    `out` when that is smaller."""
    done = _read_done(out) if recorded is not None else {split: [] for split in SPLITS}
    counts = {split: len(data.splits[split].items) for split in SPLITS}
    rows = {split: max(0, counts[split] - sum(hi - lo for lo, hi in done[split])) if arrays else 0 for split in SPLITS}
    begun = {split for split in SPLITS if done[split]}
    with_pre = "global_pre" in arrays or "width" in (old_meta or {})
    tokens = 0
    for sentences in (descriptions or {}).values():
        tokens = max(tokens, sum(len(s.split()) for s in sentences) if semantic_tokens == "word" else len(sentences))
    estimate = estimate_store(
        StoreShape(backbone.dim, backbone.num_patches, backbone.width), dtype, rows, with_pre=with_pre,
        row_arrays="global" in arrays, view_count=views if "views" not in (old_meta or {}) else 0,
        view_rows=counts["train"], classes=len(data.names), templates=len(data.spec.templates), description_tokens=tokens,
        paths={split: data.splits[split].paths for split in SPLITS if "global" in arrays and split not in begun})
    line, fault = room_line(out, estimate, " left of an interrupted extraction" if begun else "")
    if show:
        print(line, flush=True)
    if fault is not None:
        raise InputError(fault)


def _prepare(out: Path, recorded: Optional[dict], fingerprint: dict, device: torch.device, files: dict,
             splits: dict) -> None:
    """Rank 0, before any rank encodes: the store record first, then the maps and labels of every split with no row
    recorded done."""
    make_dirs(out)
    if recorded is not None and isinstance((recorded.get("done") or {}).get("train"), int):
        # a spacil 0.1 record: its row counts become rank 0's ranges before the record is rewritten without them
        legacy = {split: [[0, int(recorded["done"].get(split, 0))]] if recorded["done"].get(split) else [] for split in SPLITS}
        current = _read_done(out)
        for split in SPLITS:
            for lo, hi in current[split]:
                legacy[split] = _add_range(legacy[split], lo, hi)
        atomic_write_text(out / rank_progress_file(0), json.dumps({"done": legacy}))
    for split in SPLITS:
        _forget_rows_of_other_images(out, split, splits[split])
    devices = sorted(set((recorded or {}).get("devices", [])) | {device.type})
    state = {"fingerprint": fingerprint, "devices": devices}
    if recorded != state:
        atomic_write_text(out / PROGRESS_FILE, json.dumps(state))
    done = _read_done(out)
    for split in SPLITS:
        if done[split]:
            continue
        make_dirs(out / split)
        files[split].create()
        if "global" in files[split].arrays:  # not when z is added to a finished store: its labels and paths are there
            atomic_save_npy(out / split / "labels.npy", splits[split].labels)
            atomic_write_text(out / split / IMAGE_PATHS_FILE, json.dumps(list(splits[split].paths)))


def _without_counts(fingerprint: dict, out: Path) -> dict:
    """The settings a resumed extraction must share with the recorded one. Row counts are left to the image paths where
    every split records them (`_forget_rows_of_other_images`): a broken image removed since changes a count."""
    if all((out / split / IMAGE_PATHS_FILE).is_file() for split in SPLITS):
        return {k: v for k, v in fingerprint.items() if k != "counts"}
    return fingerprint


def _forget_rows_of_other_images(out: Path, split: str, index: SplitIndex) -> None:
    """Rank 0: when the images of `split` are no longer those its rows were encoded from (a broken file was removed or
    another added), its rows are dropped from every rank record, so that the split is encoded anew; the other split keeps
    its rows. A repaired file (same paths) changes nothing: its row was never recorded done, as a batch with an unreadable image
    stops the run before it is encoded."""
    recorded = out / split / IMAGE_PATHS_FILE
    if not recorded.is_file() or _recorded_paths(recorded) == list(index.paths):
        return
    log.warning("spacil: warning: %s: the images of split '%s' changed since the interrupted run; encoding it anew",
                out, split)
    for record in sorted(out.glob(RANK_PROGRESS_GLOB)):
        done = read_json(record).get("done", {})
        if done.get(split):
            atomic_write_text(record, json.dumps({"done": {**done, split: []}}))
    # the paths file stays until the split's files are made anew: a kill before then repeats this, never skips it


def _recorded_paths(file: Path) -> Optional[list]:
    """The image paths an interrupted run recorded; None when that file is damaged (then it is written anew)."""
    try:
        return read_image_paths(file)
    except InputError:
        return None


class _BatchRows(torch.utils.data.Sampler):
    """The loader's batches: this rank's share as indices into the train-then-test concatenation, made as they are asked
    for (a share of ImageNet's rows would be a million ints held at once)."""

    def __init__(self, share: list, first_row: dict):
        self.share = share
        self.first_row = first_row

    def __len__(self) -> int:
        return len(self.share)

    def __iter__(self):
        for split, start, end in self.share:
            yield list(range(self.first_row[split] + start, self.first_row[split] + end))


def _encode(out: Path, spec, splits: dict, files: dict, backbone: FrozenCLIP, share: list, world: _World, workers: int,
            max_batches: Optional[int], show_progress: bool) -> None:
    """Encode this rank's batches, writing each one (in a background thread) as soon as it is on the host."""
    if not share:
        return
    device = backbone.device
    transform = backbone.preprocess.transform()
    parts = [_ImageRows(splits[split], transform) for split in SPLITS]
    first_row = dict(zip(SPLITS, np.cumsum([0] + [len(p) for p in parts[:-1]]).tolist()))
    loader = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset(parts), batch_sampler=_BatchRows(share, first_row),
                                         num_workers=workers, pin_memory=device.type == "cuda")
    record = out / rank_progress_file(world.rank)
    own = read_json(record).get("done", {}) if record.exists() else {}
    done = {split: [list(r) for r in own.get(split, [])] for split in SPLITS}
    staging = _Staging(device, files[SPLITS[0]].dtype, max(end - start for _, start, end in share),
                       {name: shape[1:] for name, (_, shape) in files[SPLITS[0]].arrays.items()})
    bar = tqdm(total=sum(end - start for _, start, end in share), desc=f"extract {spec.key}", unit="img",
               disable=not show_progress)
    normalise = _Normalise(device, backbone.preprocess)
    writer = _RowWriter(files, record, done, bar, device)
    try:
        for count, ((split, start, end), (images, errors)) in enumerate(zip(share, loader)):
            broken = next((e for e in errors if e), None)
            if broken:
                raise InputError(broken)
            if max_batches is not None and count >= max_batches:
                break
            outputs = dict(zip(ROW_ARRAYS, backbone.encode_image_features(normalise(images))))
            writer.submit(split, start, end, staging.stage(outputs))
    finally:
        try:
            writer.close()
        finally:
            bar.close()


def _finish(out: Path, spec, names, backbone: FrozenCLIP, descriptions, descriptions_source, semantic_tokens,
            with_pre: bool, provenance: dict) -> None:
    """Rank 0, every row on disk: text features (and visual.proj when the store has z), then meta.json, then the
    records and leftover temporary files go."""
    prompts, template_tokens, template_norms = class_prompt_features(backbone, names, spec.templates)
    description_arrays = None
    if descriptions is not None:
        description_arrays = semantic_token_features(backbone, names, descriptions, semantic_tokens)
    write_text_features(out, prompts=prompts, templates=template_tokens, descriptions=description_arrays,
                        template_norms=template_norms)
    if with_pre:
        write_visual_proj(out, backbone.visual_projection())
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dim": backbone.dim,
        "num_patches": backbone.num_patches,
        "classes": names,
        "dataset": spec.key,
        "backbone": backbone.info.to_dict(),
        "image_tower": backbone.tower_record(),
        "preprocess": backbone.preprocess.to_dict(),
        "spacil_version": __version__,  # the spacil that finished the store (an extension: older stores lack it)
        "text": {
            "templates": list(spec.templates),
            "semantic_tokens": semantic_tokens if descriptions is not None else None,
            # relative to the store (spacil.recorded_paths)
            "descriptions_source": relative_to(descriptions_source, out) if descriptions_source else None,
        },
        **provenance,
    }
    if with_pre:
        meta["width"] = backbone.width  # last: the pre-projection arrays are read only when meta.json names it
    meta_path = out / "meta.json"
    if meta_path.exists():
        old_meta = read_json(meta_path)
        if descriptions is None:
            meta["text"] = old_meta.get("text", meta["text"])
        elif "pairwise_source" in (old_meta.get("text") or {}):
            meta["text"]["pairwise_source"] = old_meta["text"]["pairwise_source"]
        if "views" in old_meta:  # added to the finished store (store/views.py): its arrays stay, so does their record
            meta["views"] = old_meta["views"]
        for key in ("view_sets", "area_texts"):  # view sets and AREA's description sets, likewise
            if key in old_meta:
                meta[key] = old_meta[key]
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    _remove(out / PROGRESS_FILE)  # first: from here on the folder reads as a finished store
    for record in sorted(out.glob(RANK_PROGRESS_GLOB)):
        _remove(record)
    for folder in (out, *(out / split for split in SPLITS), out / "text", out / "backbone"):
        if folder.is_dir():
            for leftover in sorted(folder.glob(".*.tmp")):
                _remove(leftover)
