"""`spacil sweep`: the grid, the local pool, the submitit path, the refusal of changed settings, the sweep report."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import interrupt_at_task, make_random_store
from spacil.cli import main
from spacil.methods import METHODS

SET = "set: {data.init_cls: 3, data.increment: 3, train.epochs: 1}\n"


def _store(path: Path, seed: int) -> Path:
    return make_random_store(path, num_classes=9, dim=8, num_patches=4, train=4, test=2, seed=seed)


def _sweep_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def _one_by_one(store: Path, method: str, seed: int, out: Path, epochs: int = 1) -> dict:
    """The same cell as a plain `spacil run`, in this process."""
    assert main(["run", "--features", str(store), "--method", method, "--seed", str(seed), "--init-cls", "3",
                 "--increment", "3", "--set", f"epochs={epochs}", "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "summary.json").read_text())


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_local_sweep_with_two_workers_equals_runs_one_by_one_and_reports(tmp_path, capsys):
    stores = [_store(tmp_path / "stores" / name, seed) for name, seed in (("alpha", 0), ("beta", 1))]
    sweep = _sweep_file(tmp_path, f"features: [{stores[0]}, {stores[1]}]\nmethods: [simplecil, spa]\nseeds: [1, 2]\n" + SET)
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out), "--jobs", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done    ") == 8 and "2 local workers" in printed
    for store in stores:
        for method in ("simplecil", "spa"):
            for seed in (1, 2):
                alone = _one_by_one(store, method, seed, tmp_path / "alone" / store.name / method / str(seed))
                assert _summary(out / store.name / method / f"seed{seed}") == alone
    # the sweep report: rows methods, a column pair per store, mean +- std over the two seeds, in three formats
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("| method | alpha (random B0 Inc3) Ā | A_B | beta (random B0 Inc3) Ā | A_B |")
    spa = [_summary(out / "alpha" / "spa" / f"seed{s}")["avg_acc"] for s in (1, 2)]
    spa_line = next(line for line in table.splitlines() if line.startswith("| spa |")).replace("**", "")
    spread = abs(spa[0] - spa[1]) / 2 ** 0.5  # the sample standard deviation of two values
    assert spa_line.startswith(f"| spa | {sum(spa) / 2:.2f} ± {spread:.2f} |")
    csv_lines = (out / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 4 and csv_lines[1].startswith("alpha,")
    import csv
    rows = {(r["entry"], r["method"]): r for r in csv.DictReader(csv_lines)}
    assert abs(float(rows[("alpha", "spa")]["avg_acc_std"]) - spread) < 1e-6
    tex = (out / "report.tex").read_text()
    assert "\\multicolumn{2}{c}{alpha (random B0 Inc3)}" in tex and "$\\pm$" in tex and tex.count("\\\\") == 4
    assert (out / "curves_alpha.png").stat().st_size > 5_000 and (out / "curves_beta.png").is_file()
    # rerun: nothing to do
    assert main(["sweep", str(sweep), "--out", str(out), "--quiet"]) == 0
    assert "8 of 8 cells already done" in capsys.readouterr().out


def _interrupt_cell(store: Path, folder: Path, monkeypatch) -> None:
    """Leave `folder` as an interrupted run: spa, seed 2, stopped during task 3 (checkpoint after task 2)."""
    learner = METHODS["spa"]
    original = interrupt_at_task(monkeypatch, learner, 2)
    assert main(["run", "--features", str(store), "--method", "spa", "--seed", "2", "--init-cls", "3", "--increment", "3",
                 "--set", "epochs=1", "--out", str(folder), "--quiet"]) == 130
    monkeypatch.setattr(learner, "fit_task", original)


def test_killed_sweep_rerun_redoes_nothing_finished_and_resumes(tmp_path, capsys, monkeypatch):
    store = _store(tmp_path / "world", 0)
    sweep = _sweep_file(tmp_path, f"features: [{store}]\nmethods: [simplecil, spa]\nseeds: [1, 2]\n" + SET)
    out = tmp_path / "out"
    _interrupt_cell(store, out / "world" / "spa" / "seed2", monkeypatch)
    assert main(["sweep", str(sweep), "--out", str(out), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "resume" in plan and "world/spa/seed2  [after task 2/3]" in plan and "3 to run" in plan
    # Ctrl-C in a terminal: SIGINT to the sweep's whole process group, once the first run has finished
    process = subprocess.Popen([sys.executable, "-m", "spacil", "sweep", str(sweep), "--out", str(out), "--quiet"],
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = out / "world" / "simplecil" / "seed1" / "summary.json"
    deadline = time.monotonic() + 120
    while not (first.is_file() and _summary(first.parent).get("complete")) and process.poll() is None:
        assert time.monotonic() < deadline, "the sweep never finished its first run"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGSTOP)  # freeze the group, see what is finished, then interrupt it
    finished = {p.parent: p.read_bytes() for p in out.glob("world/*/seed*/summary.json") if json.loads(p.read_text())["complete"]}
    stamps = {folder: (folder / "summary.json").stat().st_mtime_ns for folder in finished}
    os.killpg(process.pid, signal.SIGINT)
    os.killpg(process.pid, signal.SIGCONT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err.decode()
    assert len(finished) < 4
    # rerun: finished cells untouched, the others run or resume, and every result equals a run started alone
    assert main(["sweep", str(sweep), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done    ") == 4 - len(finished)
    for folder, content in finished.items():
        assert (folder / "summary.json").read_bytes() == content
        assert (folder / "summary.json").stat().st_mtime_ns == stamps[folder]
    for method in ("simplecil", "spa"):
        for seed in (1, 2):
            alone = _one_by_one(store, method, seed, tmp_path / "alone" / method / str(seed))
            assert _summary(out / "world" / method / f"seed{seed}") == alone
    assert "resuming after task 2" in (out / "world" / "spa" / "seed2" / "log.txt").read_text()


def test_submitit_local_executor_runs_the_slurm_path(tmp_path, capsys):
    import submitit

    from spacil.sweep.grid import run_sweep
    from spacil.sweep.slurm import SweepCellJob

    store = _store(tmp_path / "world", 0)
    sweep = _sweep_file(tmp_path, f"features: [{store}]\nmethods: [simplecil, zeroshot]\nseeds: [5]\n" + SET
                        + "slurm: {partition: gpu, timeout_min: 10, cpus_per_task: 1}\n")
    out = tmp_path / "out"

    def local(folder):
        return submitit.AutoExecutor(folder=folder, cluster="local")

    assert run_sweep(sweep, out, executor="slurm", make_submitit_executor=local, echo=print) == 0
    printed = capsys.readouterr().out
    assert "submitted 2 runs as job array" in printed and "squeue -j" in printed
    submitted = json.loads((out / ".submitit" / "submitted.json").read_text())
    assert set(submitted) == {"world/simplecil/seed5", "world/zeroshot/seed5"}
    deadline = time.monotonic() + 180
    folders = [out / "world" / m / "seed5" for m in ("simplecil", "zeroshot")]
    while not all((f / "summary.json").is_file() and _summary(f).get("complete") for f in folders):
        assert time.monotonic() < deadline, list((out / ".submitit").glob("*"))
        time.sleep(0.2)
    for method, folder in zip(("simplecil", "zeroshot"), folders):
        assert _summary(folder) == _one_by_one(store, method, 5, tmp_path / "alone" / method)
    assert list((out / ".submitit").glob("*_log.out")), "submitit writes one log per job in OUT/.submitit"
    # running it again reports what is done and submits nothing
    for _ in range(100):  # the job processes may still be writing their result pickles
        if all(list((out / ".submitit").glob(f"{job}_*result.pkl")) for job in submitted.values()):
            break
        time.sleep(0.1)
    assert run_sweep(sweep, out, executor="slurm", make_submitit_executor=local, echo=print) == 0
    assert "2 of 2 cells already done" in capsys.readouterr().out
    # preemption: checkpoint() resubmits the same cell, which resumes from the run's own checkpoint
    job = SweepCellJob()
    again = job.checkpoint({"method": "zeroshot"}, "somewhere")
    assert isinstance(again, submitit.helpers.DelayedSubmission) and isinstance(again.function, SweepCellJob)
    assert again.args == ({"method": "zeroshot"}, "somewhere")


def test_changed_settings_are_refused_unless_forced(tmp_path, capsys):
    store = _store(tmp_path / "world", 0)
    out = tmp_path / "out"
    text = f"features: [{store}]\nmethods: [simplecil]\nseeds: [1, 2]\nvariants: {{plain: {{}}}}\n" + SET
    sweep = _sweep_file(tmp_path, text)
    _one_by_one(store, "simplecil", 1, out / "world" / "simplecil" / "seed1")  # the same settings as the sweep's cell
    assert main(["sweep", str(sweep), "--out", str(out), "--dry-run"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert plan[0].startswith("skip (done)") and "world/simplecil/seed1" in plan[0]
    assert plan[1].startswith("run") and "world/simplecil/seed2" in plan[1]
    assert plan[2] == f"2 cells under {out}: 1 done, 0 to resume, 1 to run, 0 with changed settings"
    assert not (out / "world" / "simplecil" / "seed2").exists()  # a dry run writes nothing
    sweep.write_text(text.replace("train.epochs: 1", "train.epochs: 2"))
    before = (out / "world" / "simplecil" / "seed1" / "summary.json").read_bytes()
    assert main(["sweep", str(sweep), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seed1: settings changed since it ran (train.epochs)" in err and "--force" in err
    assert (out / "world" / "simplecil" / "seed1" / "summary.json").read_bytes() == before
    assert main(["sweep", str(sweep), "--out", str(out), "--dry-run", "--force"]) == 0
    assert "redo (--force)  world/simplecil/seed1  [train.epochs]" in capsys.readouterr().out
    assert main(["sweep", str(sweep), "--out", str(out), "--force", "--quiet"]) == 0
    for seed in (1, 2):
        saved = (out / "world" / "simplecil" / f"seed{seed}" / "config.yaml").read_text()
        assert "epochs: 2" in saved and _summary(out / "world" / "simplecil" / f"seed{seed}")["complete"]


@pytest.mark.parametrize("text, message", [
    ("features: [S]\nmethod: [spa]\n", "unknown key 'method'"),
    ("features: [S]\nseeds: [one]\n", "bad value 'one' for 'seeds.0'"),
    ("features: [S]\nmethods: [spa, nope]\n", "methods: unknown method 'nope'"),
    ("features: [S]\nvariants: {x: {methods: [spa, nope], top_k_patches: 2}}\n", "variants.x.methods: unknown method 'nope'"),
    ("features: [S]\nset: {train.epochz: 1}\n", "unknown config key"),
    ("features: [S]\nvariants: {no_ot: {ablation.optimal_transprt: false}}\n", "variants.no_ot"),
    ("features: [S]\nvariants: {a: {}, b: {}}\n", "is the same run as"),
    ("features: [S]\nvariants: {a: {top_k_patches: 4}, b: {top_k_patches: 4}}\n", "is the same run as"),
    ("features: [S]\nseeds: [true]\n", "for 'seeds.0'"),
    ("features: [S]\nseeds: [1, 1]\n", "is the same run as"),
    ("features: [S/missing]\n", "no feature store there"),
    ("features: [S]\nset: {seed: 3}\n", "set.seed: the grid's seeds are given by 'seeds:'"),
    ("features: [S]\nslurm: {partitionn: gpu}\n", "slurm.partitionn"),
    ("configs: [no_such_config]\n", "no such config file"),
    ("methods: [spa]\n", "nothing to run"),
    ("- features\n", "must be a mapping"),
    ("features: [S\n", "not valid YAML"),
])
def test_bad_sweep_yaml_exits_2_with_one_line(tmp_path, capsys, text, message):
    store = _store(tmp_path / "world", 0)
    sweep = _sweep_file(tmp_path, text.replace("S", str(store)))
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "out"), "--executor", "slurm", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(sweep) in err, err
    assert not (tmp_path / "out").exists()


def test_missing_sweep_file_and_packaged_grid(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no such sweep file (packaged sweeps: " in err and "paper_grid" in err
    # the packaged paper grid resolves: every data set, both splits, SPA, its six ablations and the baselines, 3 seeds
    # (18 configs x (8 methods + 6 ablations of SPA) x 3 seeds; a method added to the grid adds 54)
    assert main(["sweep", "paper_grid", "--out", str(tmp_path / "paper"), "--dry-run"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert plan[-1].startswith("864 cells under") and "864 to run" in plan[-1]
    assert any(line.endswith("cifar224_b0/spa-no_ot/seed1993") for line in plan)
    assert any(line.endswith("sun_b150/simplecil/seed1995") for line in plan)
    assert any(line.endswith("cub_b100/ranpac/seed1994") for line in plan) and any("/bofa/" in line for line in plan)


def test_each_local_worker_gets_one_gpu_or_a_share_of_the_cores():
    from spacil.sweep.local import worker_env

    assert [worker_env(slot, 2, ["4", "7"], 16)["CUDA_VISIBLE_DEVICES"] for slot in range(3)] == ["4", "7", "4"]
    cpu = worker_env(1, 3, [], 8)  # a share of the cores, within which the worker's run picks its threads
    assert cpu["SPACIL_CPU_SHARE"] == "2"
    assert worker_env(0, 4, [], 2)["SPACIL_CPU_SHARE"] == "1"


def test_runs_that_need_one_store_wait_for_a_single_extraction(tmp_path, monkeypatch):
    """Two processes (here threads) asking for a missing store: one extracts, the other waits and reuses it."""
    import spacil.store.extract
    from spacil.config import build_config
    from spacil.pipeline import prepare_store

    calls = []

    def slow_extract(dataset, data_root, out, **kwargs):
        calls.append(out)
        time.sleep(0.3)
        _store(Path(out), 0)

    monkeypatch.setattr(spacil.store.extract, "extract_store", slow_extract)
    config = build_config({"data": {"features": str(tmp_path / "stores" / "world"), "data_root": str(tmp_path)}})
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare_store(config, progress=False))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 2
    assert (tmp_path / "stores" / "world.lock").exists()
