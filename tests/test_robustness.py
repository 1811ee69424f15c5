"""Issue 16: one writer per run folder, full disks, bad values as one line, no silent NaN, reports as a paper needs them."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_random_store
from spacil.cli import main
from spacil.errors import InputError
from spacil.runlock import RunFolderLock

RUN = ["--method", "simplecil", "--init-cls", "6", "--increment", "3", "--quiet"]


def _run(store: Path, out: Path, *extra: str) -> int:
    return main(["run", "--features", str(store), *RUN, "--out", str(out), *extra])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spacil: error: "), err
    return err


def _world(tmp_path: Path) -> Path:
    """A small store of 6 classes for sweeps."""
    return make_random_store(tmp_path / "world", num_classes=6, dim=8, num_patches=4, train=4, test=2, seed=0)


def _holder_script(folder: Path) -> str:
    return (f"import sys, time; from spacil.runlock import RunFolderLock; lock = RunFolderLock({str(folder)!r}).acquire(); "
            f"print('held', flush=True); time.sleep(600)")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}


# one writer per run folder ----------------------------------------------------------------------------------------------
def test_a_second_writer_of_a_run_folder_is_exit_2_naming_the_holder(random_store, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _holder_script(out)], stdout=subprocess.PIPE, env=_env())
    try:
        assert holder.stdout.readline().strip() == b"held"
        assert _run(random_store, out) == 2
        err = _one_line(capsys)
        assert str(out) in err and f"process {holder.pid}" in err
        assert _run(random_store, out, "--resume") == 2  # --resume is a writer too
        capsys.readouterr()
    finally:
        holder.kill()
        holder.wait()
    # the holder died (kill -9): its lock is taken over, the run goes through
    assert _run(random_store, out) == 0
    assert json.loads((out / "summary.json").read_text())["complete"]


def test_the_lock_is_released_when_the_run_ends_or_fails(random_store, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(random_store, out) == 0
    assert _run(random_store, out) == 2  # "holds a run already": a refusal that must not keep the lock
    assert "holds a run already" in _one_line(capsys)
    with RunFolderLock(out):  # free again: this process can take it
        pass


def test_killed_sweep_takes_its_worker_with_it_and_a_rerun_has_one_writer(tmp_path, capsys):
    store = make_random_store(tmp_path / "world", num_classes=6, dim=16, num_patches=4, train=40, test=4, seed=3)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"features: [{store}]\nmethods: [finetune]\nseeds: [1]\n"
                     "set: {data.init_cls: 2, data.increment: 2, train.epochs: 60}\n")
    out = tmp_path / "out"
    cell = out / "world" / "finetune" / "seed1"
    process = subprocess.Popen([sys.executable, "-m", "spacil", "sweep", str(sweep), "--out", str(out), "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 120
    while not (cell / ".writer.pid").is_file():
        assert time.monotonic() < deadline and process.poll() is None, "the worker never took its run folder"
        time.sleep(0.02)
    worker = int((cell / ".writer.pid").read_text())
    process.kill()  # kill -9 of the sweep alone: the worker gets SIGTERM from the kernel (or sees its parent gone)
    process.wait()
    deadline = time.monotonic() + 60
    while _alive(worker):
        assert time.monotonic() < deadline, f"worker {worker} outlived its sweep"
        time.sleep(0.05)
    # the rerun: the cell runs (or resumes) once, and ends as a run started alone
    assert main(["sweep", str(sweep), "--out", str(out), "--quiet"]) == 0
    assert main(["run", "--features", str(store), "--method", "finetune", "--seed", "1", "--init-cls", "2",
                 "--increment", "2", "--set", "epochs=60", "--out", str(tmp_path / "alone"), "--quiet"]) == 0
    summary = json.loads((cell / "summary.json").read_text())
    assert summary == json.loads((tmp_path / "alone" / "summary.json").read_text())
    log = (cell / "log.txt").read_text()
    for task in (1, 2, 3):
        assert log.count(f"task {task}/3:") == 1, log


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def test_a_sweep_never_starts_a_cell_whose_folder_is_locked(tmp_path, capsys):
    store = _world(tmp_path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"features: [{store}]\nmethods: [simplecil]\nseeds: [1, 2]\n"
                     "set: {data.init_cls: 3, data.increment: 3}\n")
    out = tmp_path / "out"
    with RunFolderLock(out / "world" / "simplecil" / "seed1"):
        assert main(["sweep", str(sweep), "--out", str(out), "--dry-run"]) == 0
        plan = capsys.readouterr().out.splitlines()
        assert plan[0].startswith("skip (running)") and plan[0].endswith(f"world/simplecil/seed1  [written by process {os.getpid()}]")
        assert main(["sweep", str(sweep), "--out", str(out), "--quiet"]) == 0
        printed = capsys.readouterr().out
        assert f"not started, its folder is written by process {os.getpid()}: world/simplecil/seed1" in printed
        assert not (out / "world" / "simplecil" / "seed1" / "summary.json").exists()
        assert json.loads((out / "world" / "simplecil" / "seed2" / "summary.json").read_text())["complete"]


def test_a_sweep_worker_follows_its_parent(monkeypatch):
    from spacil.sweep import lifeline

    monkeypatch.delenv(lifeline.SWEEP_PARENT_ENV, raising=False)
    assert lifeline.follow_parent() is False
    child = subprocess.run([sys.executable, "-c", "from spacil.sweep.lifeline import follow_parent; follow_parent()"],
                           env={**_env(), lifeline.SWEEP_PARENT_ENV: "1"}, capture_output=True, text=True)
    # its recorded parent (pid 1) is not its parent: it stops at once, as Ctrl-C stops it
    assert child.returncode != 0 and "KeyboardInterrupt" in child.stderr
    ok = subprocess.run([sys.executable, "-c", "from spacil.sweep.lifeline import follow_parent; print(follow_parent())"],
                        env={**_env(), lifeline.SWEEP_PARENT_ENV: str(os.getpid())}, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "True"


# full disks --------------------------------------------------------------------------------------------------------------
def _full_disk(monkeypatch, module, name: str, when=lambda *a: True):
    """Make `module.name` (a write call) fail as a full disk does, while `when(args)` holds."""
    original = getattr(module, name)

    def full(*args, **kwargs):
        if when(*args):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, full)


def test_atomic_writers_turn_a_full_disk_into_one_line_and_leave_no_temporary_file(tmp_path, monkeypatch):
    import spacil.fileio as fileio

    _full_disk(monkeypatch, fileio.os, "replace")  # the last step of every atomic write
    for write in (lambda p: fileio.atomic_write_text(p, "x"), lambda p: fileio.atomic_save_npy(p, np.zeros(3)),
                  lambda p: fileio.atomic_write_bytes(p, b"x")):
        path = tmp_path / "file"
        with pytest.raises(InputError) as caught:
            write(path)
        assert str(path) in str(caught.value) and "No space left on device" in str(caught.value)
        assert " free" in str(caught.value) and "make room" in str(caught.value)
        assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_checkpointing_is_exit_2_and_the_run_resumes(random_store, tmp_path, monkeypatch, capsys):
    import spacil.fileio as fileio

    _run(random_store, tmp_path / "clean")
    _full_disk(monkeypatch, fileio.os, "fsync", when=lambda fd: os.readlink(f"/proc/self/fd/{fd}").endswith(".last.pt.tmp")
               if os.path.exists("/proc/self/fd") else True)
    out = tmp_path / "run"
    assert _run(random_store, out) == 2
    err = _one_line(capsys)
    assert str(out / "checkpoints" / "last.pt") in err and "No space left on device" in err
    assert not list((out / "checkpoints").glob(".*.tmp"))
    monkeypatch.undo()  # room made
    assert _run(random_store, out, "--resume") == 0
    assert (out / "summary.json").read_bytes() == (tmp_path / "clean" / "summary.json").read_bytes()


def test_descriptions_and_sweep_files_on_a_full_disk(tmp_path, monkeypatch, capsys):
    import spacil.fileio as fileio
    from spacil.describe.descriptions import DescriptionSet

    _full_disk(monkeypatch, fileio.os, "fsync")
    with pytest.raises(InputError, match="descriptions.json: cannot write"):
        DescriptionSet(source="json", classes={"a": {"descriptions": ["x."]}}).save(tmp_path / "descriptions.json")
    store = _world(tmp_path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"features: [{store}]\nmethods: [simplecil]\nset: {{data.init_cls: 3, data.increment: 3}}\n")
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "sweep.json: cannot write (No space left on device" in _one_line(capsys)


def test_a_full_disk_during_extraction_is_exit_2_and_extraction_resumes(tiny_model, shapes_root, tmp_path, monkeypatch,
                                                                        capsys):
    import spacil.store.extract as extract

    common = ["extract", "--dataset", "shapes", "--data-root", str(shapes_root), "--model", tiny_model,
              "--pretrained", "", "--batch-size", "8", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "clean")]) == 0
    calls = []
    _full_disk(monkeypatch, extract, "_write_rows", when=lambda *a: calls.append(1) or len(calls) > 2)
    out = tmp_path / "store"
    assert main(common + ["--out", str(out)]) == 2
    err = _one_line(capsys)
    assert ".npy: cannot write (No space left on device" in err and str(out) in err
    monkeypatch.undo()
    assert main(common + ["--out", str(out)]) == 0
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    clean = {p.relative_to(tmp_path / "clean"): p.read_bytes() for p in (tmp_path / "clean").rglob("*") if p.is_file()}
    assert files == clean


def _small_disk(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def test_a_real_full_disk_then_room_made(random_store, tmp_path, capsys):
    """On a tmpfs far too small for a run (where the test runs as root and may mount one)."""
    disk = tmp_path / "disk"
    if not _small_disk(disk, "12k"):
        pytest.skip("no small tmpfs here (needs root and mount)")
    try:
        assert _run(random_store, disk / "run", "--set", "ot_iters=1") == 2
        err = _one_line(capsys)
        assert str(disk / "run") in err and "No space left on device" in err and "free" in err
        assert not list((disk / "run").rglob("*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)  # room made
        assert _run(random_store, disk / "run", "--set", "ot_iters=1", "--resume") == 0
        assert _run(random_store, tmp_path / "clean", "--set", "ot_iters=1") == 0
        assert (disk / "run" / "summary.json").read_bytes() == (tmp_path / "clean" / "summary.json").read_bytes()
    finally:
        subprocess.run(["umount", str(disk)])


# bad values -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_out_of_range_is_one_line(random_store, tmp_path, capsys, seed):
    assert _run(random_store, tmp_path / "run", "--seed", seed) == 2
    assert "seed" in _one_line(capsys)
    assert not (tmp_path / "run").exists()


def test_top_k_patches_above_the_stores_patches_is_refused(random_store, tmp_path, capsys):
    assert main(["run", "--features", str(random_store), "--method", "spa", "--init-cls", "6", "--increment", "3",
                 "--set", "top_k_patches=1000", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = _one_line(capsys)
    assert "top_k_patches=1000" in err and "has 9 patch tokens per image; expected at most 9" in err


@pytest.mark.parametrize("content", [{"red square": ["", "  "]}, {"format": "spacil-descriptions", "version": 1,
                                                                  "classes": {"red square": {"descriptions": ["ok.", " "]}}}])
def test_blank_descriptions_are_refused(tmp_path, content):
    from spacil.describe.descriptions import load_descriptions

    path = tmp_path / "descriptions.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InputError, match="a blank description"):
        load_descriptions(path)


def _sweep(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("seeds: [-1]\nset: {data.init_cls: 3, data.increment: 3}\n", "seeds.0"),
    ("seeds: [4294967296]\nset: {data.init_cls: 3, data.increment: 3}\n", "seeds.0"),
    ("set: {data.init_cls: 4, data.increment: 4}\n", "increment=4: does not divide"),
    ("set: {data.init_cls: 9, data.increment: 3}\n", "init_cls=9: more than the 6 classes"),
])
def test_a_sweep_checks_seeds_and_every_split_before_it_launches(tmp_path, capsys, text, message):
    store = _world(tmp_path)
    sweep = _sweep(tmp_path, f"features: [{store}]\nmethods: [simplecil]\n" + text)
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "out")]) == 2
    assert message in _one_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("slurm, message", [("{}", "SLURM is not on this machine"),
                                            ("{timeout_min: -5}", "slurm.timeout_min: -5, expected a positive integer"),
                                            ("{mem_gb: lots}", "slurm.mem_gb")])
def test_slurm_without_slurm_or_with_bad_values_writes_nothing(tmp_path, capsys, monkeypatch, slurm, message):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch, srun, squeue
    store = _world(tmp_path)
    sweep = _sweep(tmp_path, f"features: [{store}]\nmethods: [simplecil]\nset: {{data.init_cls: 3, data.increment: 3}}\n"
                   f"slurm: {slurm}\n")
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "out"), "--executor", "slurm"]) == 2
    assert message in _one_line(capsys)
    assert not (tmp_path / "out").exists()


def _finished_run(store: Path, folder: Path, seed: int = 1) -> Path:
    assert _run(store, folder, "--seed", str(seed)) == 0
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(avg_acc="high"), "'avg_acc' is 'high', expected a number"),
    (lambda s: s.update(avg_acc=s["avg_acc"] + 3), "contradicts itself"),
    (lambda s: s.update(last_acc=s["curve"][0] - 1), "'last_acc'"),
    (lambda s: s.update(seed=-4), "'seed' is -4"),
    (lambda s: s.update(complete="yes"), "'complete' is 'yes'"),
    (lambda s: s.update(task_sizes=[6, 0]), "'task_sizes'"),
    (lambda s: s.update(curve=[]), "'curve' must be a non-empty list"),
])
def test_a_bad_summary_is_refused_by_report_and_by_a_dry_run(random_store, tmp_path, capsys, edit, message):
    sweep = _sweep(tmp_path, f"features: [{random_store}]\nmethods: [simplecil]\nseeds: [1]\n"
                   "set: {data.init_cls: 6, data.increment: 3}\n")
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out), "--quiet"]) == 0
    path = out / "store" / "simplecil" / "seed1" / "summary.json"
    summary = json.loads(path.read_text())
    edit(summary)
    path.write_text(json.dumps(summary))
    capsys.readouterr()
    for command in (["sweep", str(sweep), "--out", str(out), "--dry-run"], ["report", str(path.parent)], ["report", str(out)]):
        assert main(command) == 2, command
        err = _one_line(capsys)
        assert message in err and str(path) in err


def test_a_damaged_checkpoint_in_a_sweep_is_named_and_redone_under_force(random_store, tmp_path, capsys, monkeypatch):
    from conftest import interrupt_at_task
    from spacil.methods import METHODS

    sweep = _sweep(tmp_path, f"features: [{random_store}]\nmethods: [simplecil]\nseeds: [1]\n"
                   "set: {data.init_cls: 6, data.increment: 3}\n")
    out = tmp_path / "out"
    cell = out / "store" / "simplecil" / "seed1"
    original = interrupt_at_task(monkeypatch, METHODS["simplecil"], 1)
    assert _run(random_store, cell, "--seed", "1") == 130
    monkeypatch.setattr(METHODS["simplecil"], "fit_task", original)
    checkpoint = cell / "checkpoints" / "last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    capsys.readouterr()
    assert main(["sweep", str(sweep), "--out", str(out), "--quiet"]) == 2
    err = _one_line(capsys)
    assert f"{cell}: checkpoints/last.pt truncated or damaged; pass --force to redo" in err
    assert main(["sweep", str(sweep), "--out", str(out), "--quiet", "--force"]) == 0
    assert json.loads((cell / "summary.json").read_text())["complete"]


# no silent NaN ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split, file", [("train", "global.npy"), ("test", "global.npy"), ("train", "patches.npy")])
def test_a_non_finite_feature_is_exit_2_naming_file_and_row(random_store, tmp_path, capsys, split, file):
    array = np.load(random_store / split / file, mmap_mode="r+")
    array[5].flat[3] = np.nan if file == "global.npy" else np.inf
    array.flush()
    del array
    method = "spa" if file == "patches.npy" else "simplecil"
    assert main(["run", "--features", str(random_store), "--method", method, "--init-cls", "6", "--increment", "3",
                 "--set", "epochs=1", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert f"{random_store / split / file}: row 5 holds NaN or infinite values" in _one_line(capsys)


def test_first_nonfinite_row_finds_the_row_in_every_dtype():
    from spacil.runner import first_nonfinite_row

    for dtype in (np.float16, np.float32, np.float64):
        data = np.ones((6, 3, 2), dtype=dtype)
        assert first_nonfinite_row(data) is None
        data[4, 1, 0] = -np.inf
        data[5, 0, 1] = np.nan
        assert first_nonfinite_row(data) == 4
    big = np.full((2, 2), 65504, dtype=np.float16)  # the largest finite float16 is finite
    assert first_nonfinite_row(big) is None


# reports ----------------------------------------------------------------------------------------------------------------
def test_report_over_seeds_aggregates_and_names_data_and_split(random_store, tmp_path, capsys):
    runs = [str(_finished_run(random_store, tmp_path / f"seed{seed}", seed)) for seed in (1, 2)]
    summaries = [json.loads((Path(r) / "summary.json").read_text()) for r in runs]
    capsys.readouterr()
    assert main(["report", *runs, "--out", str(tmp_path / "report")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| method | data | split | seeds | n | avg acc | last acc | forgetting | tasks |"
    values = [s["avg_acc"] for s in summaries]
    assert table[2].startswith(f"| simplecil | random | B6 Inc3 | 1 2 | 2 | {np.mean(values):.2f} ± "
                               f"{np.std(values, ddof=1):.2f} |") and len(table) == 3
    csv = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert csv[0].startswith("method,data,split,seed,") and len(csv) == 3  # one line per run, with its seed


def test_sweep_report_rows_are_labels_and_columns_data_set_names(tmp_path, capsys):
    store = make_random_store(tmp_path / "stores" / "my_store", num_classes=6, dim=8, num_patches=4, train=4, test=2,
                              seed=0)
    meta = json.loads((store / "meta.json").read_text())
    meta["dataset"] = "cifar224"
    (store / "meta.json").write_text(json.dumps(meta))
    sweep = _sweep(tmp_path, f"features: [{store}]\nmethods: [spa]\nseeds: [1]\n"
                   "variants: {full: {}, no_ot: {ablation.optimal_transport: false}}\n"
                   "set: {data.init_cls: 3, data.increment: 3, train.epochs: 1}\n")
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| method | CIFAR-100 B0 Inc3 Ā | A_B |")
    assert [line.split(" | ")[0] for line in table[2:]] == ["| spa", "| spa (no OT)"], table


def test_a_process_waiting_for_a_store_says_so_once(tmp_path, monkeypatch, capsys):
    from filelock import FileLock

    from spacil.config import build_config
    from spacil.pipeline import prepare_store, store_lock_path

    store = tmp_path / "stores" / "world"
    config = build_config({"data": {"features": str(store), "data_root": str(tmp_path)}})
    store.parent.mkdir(parents=True)
    holder = FileLock(store_lock_path(store))
    holder.acquire()
    import threading

    import spacil.store.extract

    monkeypatch.setattr(spacil.store.extract, "extract_store",
                        lambda dataset, root, out, **kw: make_random_store(Path(out), num_classes=4, dim=4, num_patches=2,
                                                                           train=2, test=1, seed=0))
    done = []
    thread = threading.Thread(target=lambda: done.append(prepare_store(config, progress=False)))
    thread.start()
    time.sleep(0.5)
    holder.release()
    thread.join(timeout=30)
    err = capsys.readouterr().err
    assert done and err.count("waiting for") == 1 and f"waiting for {store}: another process is extracting it" in err
