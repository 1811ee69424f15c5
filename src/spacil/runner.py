"""The runner: the class-incremental task loop over a feature store, evaluation, checkpoints and the run folder.

Run folder (INTERFACES.md): config.yaml, class_order.json, metrics.jsonl, acc_matrix.csv, summary.json, log.txt, and
checkpoints/last.pt (the learner after the last finished task, for `--resume`). Every file is replaced atomically after each
task, so an interrupted run keeps all it had finished.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import pickle
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from spacil import __version__
from spacil.config import Config, differing_keys, dump_config, read_yaml_mapping
from spacil.devices import cpu_threads, device_name, memory_budget, resolve_device, use_device
from spacil.data import class_order, task_boundaries, task_sizes
from spacil.errors import InputError
from spacil.store.finite import check_whole_arrays, first_nonfinite_row
from spacil.store.format import SPLITS, FeatureStore, rows_as_tensor
from spacil.store.rows import require_text_inputs, row_arrays
from spacil.fileio import append_text, atomic_write_bytes, atomic_write_text, make_dirs
from spacil.learner import Learner, LearnerContext, TaskData, TaskInfo
from spacil.methods import METHODS, create_learner
from spacil.recorded_paths import resolve_recorded
from spacil.runlock import RunFolderLock
from spacil.metrics import TaskEvaluation, accuracy_matrix, evaluate_task, summarise

log = logging.getLogger(__name__)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _file_name(array: np.ndarray, name: str) -> str:
    """The file a per-row array was mapped from (a view set's `views_<transform>_global_pre.npy`, or the first views'
    `views_global_pre.npy`, whatever name the learner reads it by), for the NaN check's one line."""
    filename = getattr(array, "filename", None)  # np.memmap of the store's file
    return Path(filename).name if filename else f"{name}.npy"


class Run:
    """One class-incremental run of one method over one store."""

    def __init__(self, config: Config, store: FeatureStore, out: str | Path, resume: bool = False,
                 echo: Optional[Callable[[str], None]] = None, progress: bool = False, check_finite: bool = True):
        self.device = resolve_device(config.device)
        use_device(self.device)  # pinned copies and the prefetch thread refer to the current device, not GPU 0
        # the resolved device is what config.yaml records ('auto' says nothing about where a run computed)
        config = config.model_copy(update={"device": device_name(self.device)})
        self.config = config
        self.store = store
        self.out = Path(out)
        self.echo = echo or (lambda line: None)
        learner_class = METHODS.get(config.method)
        for split, names in (("train", getattr(learner_class, "train_arrays", ())),
                             ("test", getattr(learner_class, "eval_arrays", ()))):
            row_arrays(store, split, names, config.method)  # a missing one: exit 2 before anything is written
        require_text_inputs(store, getattr(learner_class, "text_inputs", ()), config.method)
        proj = None if store.visual_proj is None else torch.from_numpy(np.array(store.visual_proj, dtype=np.float32))
        context = LearnerContext(store.dim, store.num_patches, store.logit_scale, self.device, progress, store.width, proj,
                                 store.logit_bias)
        self.learner: Learner = create_learner(config, context)
        data = config.data
        self.sizes = task_sizes(store.num_classes, data.init_cls, data.increment)
        self.bounds = task_boundaries(self.sizes)
        self.order = class_order(store.num_classes, config.seed, data.shuffle)
        # data-set class index -> position in the class order
        self.position_of = np.empty(store.num_classes, dtype=np.int64)
        self.position_of[self.order] = np.arange(store.num_classes)
        if self.learner.needs_patches and store.split("train").patches is None:
            raise InputError(f"{store.path}: method '{config.method}' needs patch tokens but the store has no train/patches.npy")
        top_k = config.spa.top_k_patches
        # the default (16) is min(16, patches) on stores with fewer patch tokens (tiny models); any other value must fit
        if self.learner.needs_patches and store.num_patches < top_k != type(config.spa).model_fields["top_k_patches"].default:
            raise InputError(f"top_k_patches={config.spa.top_k_patches}: the store {store.path} has {store.num_patches} "
                             f"patch tokens per image; expected at most {store.num_patches}")
        # NaN and infinity (store/finite.py): the store's class- and model-level arrays in full, now, before anything is
        # written; the per-row arrays row by row as they are read (rows already found finite, per array)
        if check_finite:
            check_whole_arrays(store.path, store.opened, SPLITS)
        self.finite_rows: Optional[dict[str, np.ndarray]] = {} if check_finite else None
        self.evaluations: list[TaskEvaluation] = []
        self.first_task = 0
        self.lock = RunFolderLock(self.out).acquire()  # one writer per run folder, until run() returns
        try:
            self._prepare_folder(resume)
        except BaseException:
            self.lock.release()
            raise

    # run folder --------------------------------------------------------------------------------------------------------
    def _prepare_folder(self, resume: bool) -> None:
        checkpoint = self.out / "checkpoints" / "last.pt"
        starting_over = False
        if resume:
            if not checkpoint.is_file():
                if (self.out / "summary.json").exists():
                    raise InputError(f"{self.out}: nothing to resume (no checkpoints/last.pt)")
                resume = False  # an interrupted run that never finished its first task starts over
                starting_over = True
            else:
                self._check_saved_config()
                self._load_checkpoint(checkpoint)
        if not resume:
            if not starting_over and ((self.out / "summary.json").exists() or (self.out / "checkpoints").exists()):
                raise InputError(f"--out {self.out}: holds a run already; use --resume or another folder")
            make_dirs(self.out)
            atomic_write_text(self.out / "config.yaml", dump_config(self.config, folder=self.out))
            atomic_write_text(self.out / "class_order.json", json.dumps(
                {"seed": self.config.seed, "order": self.order, "task_sizes": self.sizes,
                 "classes": [self.store.classes[c] for c in self.order]}, indent=1))
            atomic_write_text(self.out / "log.txt", "")

    def _check_saved_config(self) -> None:
        """The run folder's config.yaml must parse and match this run's config (placement keys such as device aside;
        paths compared where they lead, spacil.recorded_paths)."""
        path = self.out / "config.yaml"
        saved = read_yaml_mapping(path, "run's config")
        differ = differing_keys(saved, self.config, folder=self.out)
        moved = "data.features" in differ and not self._recorded_store_exists(saved)
        if moved:  # the store is no longer where the run recorded it, and this run names where it is now
            differ.remove("data.features")
        if differ:
            shown = ", ".join(differ[:5]) + (", ..." if len(differ) > 5 else "")
            raise InputError(f"{path}: differs from this run's config ({shown}); resume with the same settings")
        if saved.get("device") != self.config.device or moved:  # a run may move: record where it computes and reads
            atomic_write_text(path, dump_config(self.config, folder=self.out))

    def _recorded_store_exists(self, saved: dict) -> bool:
        recorded = (saved.get("data") or {}).get("features") if isinstance(saved.get("data"), dict) else None
        return bool(recorded) and (resolve_recorded(recorded, self.out) / "meta.json").is_file()

    def _load_checkpoint(self, path: Path) -> None:
        evaluations = load_checkpoint(path, self.learner, self.config.method)
        if len(evaluations) > len(self.sizes):
            raise InputError(f"{path}: holds {len(evaluations)} finished tasks, this run has {len(self.sizes)}")
        self.evaluations = evaluations
        self.first_task = len(self.evaluations)

    def _log(self, line: str) -> None:
        append_text(self.out / "log.txt", line + "\n")
        log.info(line)
        self.echo(line)

    def _write_results(self, complete: bool) -> dict:
        summary = summarise(self.learner.name, self.evaluations)
        summary.update({"label": self.learner.label, "dataset": self.store.dataset, "seed": self.config.seed,
                        "task_sizes": self.sizes, "complete": complete, "spacil_version": __version__})
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(e.to_dict()) + "\n" for e in self.evaluations))
        matrix = accuracy_matrix(self.evaluations)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["after_task"] + [f"task_{j + 1}" for j in range(len(matrix))])
        for b, row in enumerate(matrix):
            writer.writerow([b + 1] + ["" if np.isnan(v) else f"{v:.4f}" for v in row])
        atomic_write_text(self.out / "acc_matrix.csv", buffer.getvalue())
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary

    def _checkpoint(self) -> None:
        folder = make_dirs(self.out / "checkpoints")
        state = {"learner": self.learner.state_dict(), "evaluations": [e.to_dict() for e in self.evaluations]}
        _check_plain(state, "checkpoint")
        # serialised in memory, written by fileio: a full disk is then one line naming the file (torch's own file writer
        # reports it as an 'unexpected pos' RuntimeError) and no temporary file is left
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(folder / "last.pt", buffer.getbuffer())

    # data views ----------------------------------------------------------------------------------------------------------
    def _rows_of(self, split: str, positions: list[int]) -> np.ndarray:
        labels = self.store.split(split).labels
        return np.flatnonzero(np.isin(self.position_of[labels], positions))

    def _task_info(self, task: int) -> TaskInfo:
        start, end = self.bounds[task]
        class_ids = self.order[start:end]
        store = self.store

        def rows(array):
            return None if array is None else rows_as_tensor(array, class_ids, self.device)

        mask = None if store.description_mask is None else torch.from_numpy(np.asarray(store.description_mask[class_ids])).to(self.device)
        pairwise = counts = None
        if store.pairwise is not None:  # among the classes seen so far only: nothing of a later class is read
            units, slots = store.pairwise.block(self.order[:end])
            pairwise, counts = torch.from_numpy(units).to(self.device), torch.from_numpy(slots).to(self.device)
        area_texts = None
        if "area_texts" in self.learner.text_inputs and store.area_texts is not None:  # the new classes' rows only
            area_texts = {name: tuple(torch.from_numpy(a).to(self.device) for a in store.area_texts.rows(name, class_ids))
                          for name in store.area_texts.arrays}
        return TaskInfo(task, list(range(start, end)), [store.classes[c] for c in class_ids], rows(store.prompts),
                        rows(store.descriptions), mask, rows(store.templates),
                        rows(store.template_norms), pairwise, counts, area_texts)

    def _split_data(self, split_name: str, task: int, positions: list[int]) -> TaskData:
        """The rows of `split_name` whose classes sit at `positions` of the class order, as a lazy TaskData."""
        split = self.store.split(split_name)
        rows = self._rows_of(split_name, positions)
        patches = split.patches if self.learner.needs_patches else None
        names = self.learner.train_arrays if split_name == "train" else self.learner.eval_arrays
        extra = {name: self._row_view(split_name, _file_name(array, name), array, rows)
                 for name, array in row_arrays(self.store, split_name, names, self.config.method).items()}
        global_ = self._row_view(split_name, "global.npy", split.global_, rows)
        return TaskData(task, global_, None if patches is None else self._row_view(split_name, "patches.npy", patches, rows),
                        self.position_of[split.labels[rows]], self.device,
                        memory_budget=memory_budget(self.device, self.config.train.device_memory_budget), extra=extra)

    def _row_view(self, split_name: str, file: str, array: np.ndarray, rows: np.ndarray) -> "_RowView":
        finite = None
        if self.finite_rows is not None:
            finite = self.finite_rows.setdefault(f"{split_name}/{file}", np.zeros(len(array), dtype=bool))
        return _RowView(array, rows, self.store.path / split_name / file, finite)

    def _task_data(self, task: int) -> TaskData:
        start, end = self.bounds[task]
        data = self._split_data("train", task, list(range(start, end)))
        if len(data) == 0:
            raise InputError(f"{self.store.path}: task {task + 1} has no training images")
        return data

    @torch.no_grad()
    def _evaluate(self, task: int) -> TaskEvaluation:
        seen_end = self.bounds[task][1]
        data = self._split_data("test", task, list(range(seen_end)))
        predictions, targets = [], []
        for batch in data.batches(self.config.train.eval_batch_size, with_patches=self.learner.needs_patches):
            predictions.append(self.learner.predict(batch))
            targets.append(batch.targets)
        # one copy to the host per evaluation, not one wait for the device per batch
        predictions = torch.cat(predictions).cpu().numpy() if predictions else np.zeros(0, dtype=np.int64)
        targets = torch.cat(targets).cpu().numpy() if targets else np.zeros(0, dtype=np.int64)
        task_of_position = np.repeat(np.arange(len(self.sizes)), self.sizes)
        return evaluate_task(task, predictions, targets, task_of_position[targets], seen_end)

    # the loop ----------------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Run the remaining tasks; the run folder's lock is released when this returns, however it returns."""
        try:
            # CPU threads for this run's work (one for small tensors, every core for large ones), unless the user set them
            with cpu_threads(self.learner.cpu_work_elements()):
                return self._run_tasks()
        finally:
            self.lock.release()

    def _run_tasks(self) -> dict:
        config = self.config
        if self.first_task == 0:
            self._log(f"method: {self.learner.label}  data: {self.store.dataset} ({self.store.num_classes} classes)  "
                      f"tasks: {len(self.sizes)} (B{config.data.init_cls if config.data.init_cls != config.data.increment else 0} "
                      f"Inc{config.data.increment})  seed: {config.seed}  device: {config.device}")
        else:
            self._log(f"resuming after task {self.first_task} (device: {config.device})")
        remaining = range(self.first_task, len(self.sizes))
        note = self.learner.cost_note([len(self._rows_of("train", list(range(*self.bounds[t])))) for t in remaining],
                                      [self.sizes[t] for t in remaining])
        if note:  # on standard error even with --quiet: a cost to see before it is paid
            append_text(self.out / "log.txt", note + "\n")
            print(note, file=sys.stderr, flush=True)
        summary = None
        for task in range(self.first_task, len(self.sizes)):
            started = time.perf_counter()
            self.learner.begin_task(self._task_info(task))
            data = self._task_data(task)
            self.learner.fit_task(data)
            self.learner.end_task(data)
            del data  # the task's rows leave the device before the test rows come
            evaluation = self._evaluate(task)
            self.evaluations.append(evaluation)
            self._checkpoint()
            summary = self._write_results(complete=task == len(self.sizes) - 1)
            self._log(f"task {task + 1}/{len(self.sizes)}: top1 {evaluation.top1:.2f}  old {_fmt(evaluation.old)}  "
                      f"new {_fmt(evaluation.new)}  harmonic {_fmt(evaluation.harmonic)}  "
                      f"({evaluation.num_seen_classes} classes, {time.perf_counter() - started:.1f}s)")
            self._log(f"top1 curve: [{', '.join(f'{e.top1:.2f}' for e in self.evaluations)}]")
        if summary is None:
            summary = self._write_results(complete=True)
        self._log(f"Average Accuracy: {summary['avg_acc']:.2f}  Last Accuracy: {summary['last_acc']:.2f}  "
                  f"Forgetting: {summary['forgetting']:.2f}")
        return summary


def load_checkpoint(path: Path, learner: Learner, method: str) -> list[TaskEvaluation]:
    """Load checkpoints/last.pt into `learner` with weights_only=True: tensors, numbers, strings, lists and dicts, never
    code. Returns the finished tasks' evaluations."""
    try:
        # tensors come back on the CPU, whichever device wrote them; each learner places its own state (PROOF keeps its
        # exemplars on the CPU)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "unsupported global" in str(err).lower():  # a pickled class or function: the one way a pickle runs code
            raise InputError(f"{path}: refused: it holds Python objects other than tensors, numbers, strings, lists "
                             f"and dicts (loading it could run code)") from None
        raise InputError(f"{path}: not a readable checkpoint ({str(err).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError, KeyError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise InputError(f"{path}: not a readable checkpoint, truncated or damaged ({reason})") from None
    if not isinstance(state, dict) or not isinstance(state.get("learner"), dict) or not isinstance(state.get("evaluations"), list):
        raise InputError(f"{path}: not a spacil checkpoint (expected a dict with 'learner' and 'evaluations')")
    try:
        learner.load_state_dict(state["learner"])
        return [TaskEvaluation(**e) for e in state["evaluations"]]
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
        raise InputError(f"{path}: does not hold a '{method}' learner of this config "
                         f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None


def _check_plain(value, where: str) -> None:
    """A checkpoint may hold only what torch.load(weights_only=True) reads back: tensors, numbers, strings, bools, None,
    lists, tuples and dicts. Anything else is a bug of the learner's state_dict, caught when saving, not at --resume."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}, not a string or integer")
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif not (value is None or isinstance(value, (torch.Tensor, bool, int, float, str))):
        raise TypeError(f"{where}: a {type(value).__name__}; a learner's state_dict may hold only tensors, numbers, "
                        f"strings, bools, None, lists and dicts (checkpoints load with weights_only=True)")


class _RowView:
    """A lazy view of some rows of a memory-mapped array: indexing reads only the rows asked for.

    With `finite` (a mask over the array's rows, shared by the views of one run), each row is checked for NaN and
    infinity the first time it is read: a non-finite feature is an InputError naming `path` and the row, not a silent
    wrong accuracy."""

    def __init__(self, array: np.ndarray, rows: np.ndarray, path: Optional[Path] = None,
                 finite: Optional[np.ndarray] = None):
        self.array = array
        self.rows = rows
        self.path = path
        self.finite = finite

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple:
        return (len(self.rows), *self.array.shape[1:])

    @property
    def dtype(self):
        return self.array.dtype

    def __getitem__(self, index):
        rows = self.rows[index]
        data = self.array[rows]
        if self.finite is not None and not self.finite[rows].all():
            bad = first_nonfinite_row(data if np.ndim(rows) else data[None])
            if bad is not None:
                row = int(np.atleast_1d(rows)[bad])
                raise InputError(f"{self.path}: row {row} holds NaN or infinite values; re-extract the store "
                                 f"(`spacil check` lists every damaged file)")
            self.finite[rows] = True
        return data


def run_from_store(config: Config, store_path: str | Path, out: str | Path, resume: bool = False,
                   echo: Optional[Callable[[str], None]] = None, progress: bool = False) -> dict:
    store = FeatureStore(store_path)
    return Run(config, store, out, resume=resume, echo=echo, progress=progress).run()
