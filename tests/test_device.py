"""The device path: every test runs on the CPU, and again on CUDA where torch sees a GPU."""

import json
from functools import partial

import numpy as np
import ot
import pytest
import torch
import yaml

from spacil import runner as runner_module
from conftest import interrupt_at_task, make_random_store
from spacil.cli import main
from spacil.config import build_config
from spacil.ops.gaussian import GaussianBank
from spacil.learner import TaskData, task_generator
from spacil.ops.ot import CHUNK_PROBLEMS, chunk_problems, sinkhorn_log

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
RUN = ["--init-cls", "3", "--increment", "3", "--quiet"]

# Accuracy curves of these runs on conftest's random store, produced by the code before the device work (main at 6573aa1).
BEFORE_DEVICE_WORK = {
    ("spa", "epochs=2"): [75.0, 62.5, 41.66666666666667, 29.166666666666668],
    ("spa", "epochs=2", "ablation.semantic_selection=false", "projector=mlp"): [75.0, 58.333333333333336, 33.33333333333333, 37.5],
    ("simplecil",): [66.66666666666666, 54.166666666666664, 41.66666666666667, 39.58333333333333],
    ("finetune", "epochs=2"): [25.0, 4.166666666666666, 2.7777777777777777, 8.333333333333332],
    ("zeroshot",): [50.0, 37.5, 25.0, 20.833333333333336],
}


def _run(store, out, method, *overrides, device="cpu"):
    args = ["run", "--features", str(store), "--out", str(out), "--method", method, "--device", device, *RUN]
    for item in overrides:
        args += ["--set", item]
    return main(args)


@pytest.mark.parametrize("key", list(BEFORE_DEVICE_WORK), ids=lambda k: ",".join(k))
def test_cpu_results_are_those_of_before(random_store, tmp_path, key):
    assert _run(random_store, tmp_path / "r", *key) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["curve"] == BEFORE_DEVICE_WORK[key]


@pytest.mark.parametrize("device", DEVICES)
def test_spa_run_records_the_resolved_device_and_reproduces(random_store, tmp_path, device):
    for name in "ab":
        assert _run(random_store, tmp_path / name, "spa", "epochs=2", "ablation.semantic_selection=false", device=device) == 0
    a, b = (json.loads((tmp_path / name / "summary.json").read_text()) for name in "ab")
    assert a == b and len(a["curve"]) == 4
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["device"] == str(torch.device(device))
    assert f"device: {torch.device(device)}" in (tmp_path / "a" / "log.txt").read_text()


def test_auto_resolves_and_bad_devices_are_one_line_errors(random_store, tmp_path, capsys):
    assert main(["run", "--features", str(random_store), "--out", str(tmp_path / "auto"), "--method", "zeroshot", *RUN]) == 0
    saved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert saved["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert _run(random_store, tmp_path / "bad", "zeroshot", device="tpu") == 2
    err = capsys.readouterr().err
    assert "--device tpu" in err and err.count("\n") == 1


def test_resume_on_another_device(random_store, tmp_path, monkeypatch):
    """A run started elsewhere (config.yaml says cuda:0) resumes here and ends as an uninterrupted run does."""
    assert _run(random_store, tmp_path / "whole", "spa", "epochs=2") == 0
    from spacil.methods.spa import SPA

    original = interrupt_at_task(monkeypatch, SPA, 2)
    assert _run(random_store, tmp_path / "cut", "spa", "epochs=2") == 130
    monkeypatch.setattr(SPA, "fit_task", original)
    config_path = tmp_path / "cut" / "config.yaml"
    config_path.write_text(config_path.read_text().replace("device: cpu", "device: cuda:0"))
    assert main(["run", "--features", str(random_store), "--out", str(tmp_path / "cut"), "--method", "spa", "--device", "cpu",
                 "--set", "epochs=2", "--resume", *RUN]) == 0
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
    assert yaml.safe_load(config_path.read_text())["device"] == "cpu"
    assert "resuming after task 2 (device: cpu)" in (tmp_path / "cut" / "log.txt").read_text()


def _task_data(store, placement, budget=None, device="cpu"):
    split = np.load(store / "train" / "global.npy", mmap_mode="r"), np.load(store / "train" / "patches.npy", mmap_mode="r")
    rows = np.arange(5, 60)
    labels = np.load(store / "train" / "labels.npy")[rows]
    return TaskData(0, runner_module._RowView(split[0], rows), runner_module._RowView(split[1], rows), labels,
                    torch.device(device), memory_budget=budget, placement=placement)


@pytest.mark.parametrize("device", DEVICES)
def test_every_placement_yields_the_same_batches(random_store, device):
    """Rows read per batch, resident on the device (with a budget too small for the patch tokens: those stream), or
    streamed by the prefetch thread: identical float32 batches in the same order."""
    patch_bytes = 55 * 9 * 16 * 2
    datas = [_task_data(random_store, "host", device=device), _task_data(random_store, "resident", device=device),
             _task_data(random_store, "resident", budget=patch_bytes - 1, device=device),
             _task_data(random_store, "stream", device=device)]
    assert not datas[2]._resident  # nothing is uploaded before the first use
    passes = [list(d.batches(8, torch.Generator().manual_seed(3))) for d in datas]
    assert set(datas[2]._resident) == {"global", "targets"}  # patches did not fit, global rows did
    assert not datas[3]._resident
    for batches in passes[1:]:
        assert len(batches) == len(passes[0]) == 7
        for mine, reference in zip(batches, passes[0]):
            assert mine.global_.dtype == torch.float32 and mine.global_.device.type == torch.device(device).type
            assert torch.equal(mine.global_, reference.global_) and torch.equal(mine.patches, reference.patches)
            assert torch.equal(mine.targets, reference.targets) and (mine.rows == reference.rows).all()
    taken = [d.take(np.array([40, 3, 17]), with_patches=False) for d in datas]
    assert all(t.patches is None and torch.equal(t.global_, taken[0].global_) for t in taken)
    stopped = datas[3].batches(4)  # a pass left early stops its prefetch thread
    next(stopped)
    stopped.close()


@pytest.mark.parametrize("device", DEVICES)
def test_extra_row_arrays_travel_like_the_global_rows(tmp_path, device):
    """A learner's declared per-row arrays (here z, "global_pre") come in every batch beside the global rows, the same
    float32 rows whether read per batch, resident, or streamed because they do not fit the budget."""
    store = make_random_store(tmp_path / "store", width=24)
    rows = np.arange(5, 60)
    global_, z = (np.load(store / "train" / name, mmap_mode="r") for name in ("global.npy", "global_pre.npy"))
    labels = np.load(store / "train" / "labels.npy")[rows]

    def data(placement, budget=None):
        return TaskData(0, runner_module._RowView(global_, rows), None, labels, torch.device(device), memory_budget=budget,
                        placement=placement, extra={"global_pre": runner_module._RowView(z, rows)})

    datas = [data("host"), data("resident"), data("resident", budget=55 * 16 * 2), data("stream")]
    passes = [list(d.batches(8, torch.Generator().manual_seed(3), with_patches=False)) for d in datas]
    assert set(datas[1]._resident) == {"global", "global_pre", "targets"}
    assert set(datas[2]._resident) == {"global", "targets"}  # z did not fit: streamed
    for batches in passes:
        assert len(batches) == 7
        for mine, reference in zip(batches, passes[0]):
            assert list(mine.extra) == ["global_pre"] and mine.extra["global_pre"].dtype == torch.float32
            assert torch.equal(mine.extra["global_pre"], reference.extra["global_pre"])
            assert torch.equal(mine.extra["global_pre"].cpu(), torch.from_numpy(z[5 + mine.rows].astype(np.float32)))
    taken = datas[1].take(np.array([40, 3]))
    assert torch.equal(taken.extra["global_pre"].cpu(), torch.from_numpy(z[5 + np.array([3, 40])].astype(np.float32)))


@pytest.mark.parametrize("placement", ["resident", "stream"])
def test_a_run_is_the_same_whatever_the_placement(random_store, tmp_path, monkeypatch, placement):
    assert _run(random_store, tmp_path / "host", "spa", "epochs=2") == 0
    monkeypatch.setattr(runner_module, "TaskData", partial(TaskData, placement=placement))
    assert _run(random_store, tmp_path / placement, "spa", "epochs=2") == 0
    for name in ("metrics.jsonl", "acc_matrix.csv"):
        assert (tmp_path / placement / name).read_text() == (tmp_path / "host" / name).read_text()
    host = torch.load(tmp_path / "host" / "checkpoints" / "last.pt", weights_only=False)["learner"]
    other = torch.load(tmp_path / placement / "checkpoints" / "last.pt", weights_only=False)["learner"]
    for key in ("image_projector", "text_projector"):
        for name, tensor in host[key].items():
            assert torch.equal(tensor, other[key][name])


@pytest.mark.parametrize("device", DEVICES)
def test_sinkhorn_matches_pot_on_the_device(device):
    g = torch.Generator().manual_seed(0)
    cost = 1 - (torch.rand(40, 16, 8, generator=g) * 2 - 1)
    log_a, log_b = torch.full((40, 16), -np.log(16)), torch.full((40, 8), -np.log(8))
    plan = sinkhorn_log(cost.to(device), log_a.to(device), log_b.to(device), 0.1, 100)
    assert plan.device.type == torch.device(device).type
    for p in range(0, 40, 7):
        reference = ot.sinkhorn(np.full(16, 1 / 16), np.full(8, 1 / 8), cost[p].double().numpy(), 0.1, method="sinkhorn_log",
                                numItermax=100, stopThr=0.0, warn=False)
        assert np.abs(plan[p].cpu().double().numpy() - reference).max() < 1e-5


def test_sinkhorn_chunks_by_device():
    assert chunk_problems(torch.device("cpu"), 16, 8, 343_200) == CHUNK_PROBLEMS
    assert chunk_problems(torch.device("cuda"), 16, 8, 343_200) == 343_200  # a GPU solves SPA's batch in one block
    assert 1 <= chunk_problems(torch.device("cuda"), 4096, 4096, 10_000) < 10_000  # memory-bounded beyond that


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cov_type", ["full", "diag"])
def test_gaussian_sampling_is_reproducible_on_the_device(device, cov_type):
    config = build_config({})
    bank = GaussianBank(6, cov_type, device=torch.device(device))
    for position in (4, 9):
        data = torch.randn(50, 6, generator=torch.Generator().manual_seed(position), dtype=torch.float64)
        bank.add(position, data.mean(0), torch.cov(data.T) if cov_type == "full" else data.var(0))
    draws = [bank.sample(5, task_generator(config, 2, stream=2, device=torch.device(device))) for _ in range(2)]
    assert draws[0][0].device.type == torch.device(device).type and draws[0][1].tolist() == [4] * 5 + [9] * 5
    assert torch.equal(draws[0][0], draws[1][0])
    restored = GaussianBank(6, cov_type, device=torch.device(device))
    restored.load_state_dict({k: v.cpu() if torch.is_tensor(v) else v for k, v in bank.state_dict().items()})
    again = restored.sample(5, task_generator(config, 2, stream=2, device=torch.device(device)))
    assert torch.equal(again[0], draws[0][0]) and torch.equal(again[1], draws[0][1])
    if device == "cpu":  # the CPU default is the generator it always was
        plain = torch.Generator().manual_seed(config.seed * 1_000_003 + 2 * 101 + 2)
        assert torch.equal(bank.sample(5, plain)[0], draws[0][0])
