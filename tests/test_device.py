"""The device path: every test runs on the CPU, and again on CUDA where torch sees a GPU."""

import json
import threading
import warnings
from functools import partial

import numpy as np
import ot
import pytest
import torch
import yaml

from pydantic import BaseModel

from spacil import learner as learner_module
from spacil import runner as runner_module
from conftest import assert_same_state, interrupt_at_task, make_random_store
from spacil.cli import main
from spacil.config import build_config, load_config
from spacil.devices import PROCESSES_PER_GPU_ENV, local_rank_device, memory_budget
from spacil.errors import InputError
from spacil.methods import METHODS
from spacil.ops.gaussian import GaussianBank
from spacil.learner import LearnerContext, TaskData, class_sums, task_generator
from spacil.ops.ot import CHUNK_PROBLEMS, chunk_problems, sinkhorn_log
from spacil.store import extract as extract_module
from spacil.store.format import SPLITS, FeatureStore

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


# Placement, threads and sums: the CUDA semantics checked on the CPU ----------------------------------------------------

# Training stays short for every method: a few steps per task is all a placement or resume check needs.
SHORT = ["epochs=1", "proof.tuned_epoch=1", "proof.tuned_batch_size=8", "adapter_epochs=1", "adapter_batch_size=8"]
# and the knobs of methods with sections of their own (RanPAC's projection width, BOFA's and ENGINE's epochs and batches)
SHORT_BY_METHOD = {"ranpac": ["ranpac.M=64"], "bofa": ["stage1_epochs=1", "stage2_epochs=1", "bofa_batch_size=8", "Kt=4"],
                   "engine": ["engine_epochs=1", "engine_batch_size=8"],
                   "area": ["area_epochs=1", "area_batch_size=8", "basis_rank=2", "area_samples_per_class=2"]}


def _short(method: str) -> list[str]:
    return SHORT + SHORT_BY_METHOD.get(method, [])


@pytest.fixture()
def method_store(tmp_path):
    """What every registered method reads: z (RanPAC, BOFA, ENGINE, AREA), per-template text features, pairwise
    descriptions and stored views (ENGINE), AREA's view sets and description sets."""
    return make_random_store(tmp_path / "method_store", templates=3, width=24, pairwise=2, views=3, area=3)


def _tensors_of(value, path: str, seen: set):
    """(path, tensor) of every tensor a learner's attribute holds: in modules, lists, dicts and spacil's own objects."""
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, torch.nn.Module):
        for name, tensor in [*value.named_parameters(), *value.named_buffers()]:
            yield f"{path}.{name}", tensor
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors_of(item, f"{path}[{key!r}]", seen)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors_of(item, f"{path}[{index}]", seen)
    elif type(value).__module__.startswith("spacil.") and not isinstance(value, BaseModel) and hasattr(value, "__dict__"):
        for key, item in vars(value).items():
            yield from _tensors_of(item, f"{path}.{key}", seen)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_resume_places_every_learners_state_on_its_device(method_store, tmp_path, monkeypatch, method):
    """Checkpoints load to the CPU and each learner places its own state: resumed where the context says `meta` (standing
    in for a GPU), every tensor is there but for what the learner keeps on the CPU by design (PROOF's exemplars), which
    stays on the CPU. Every registered method, so methods added later are covered."""
    learner_class = METHODS[method]
    original = interrupt_at_task(monkeypatch, learner_class, 2)
    assert _run(method_store, tmp_path / "r", method, *_short(method)) == 130
    monkeypatch.setattr(learner_class, "fit_task", original)
    config = load_config(tmp_path / "r" / "config.yaml")  # its paths are relative to the run folder (issue 26)
    monkeypatch.setattr(runner_module, "resolve_device", lambda name: torch.device("meta"))
    with warnings.catch_warnings():  # (spacil's main reset the filters) loading into meta tensors copies nothing, and says so
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        run = runner_module.Run(config, FeatureStore(method_store), tmp_path / "r", resume=True)
    learner = run.learner
    assert run.first_task == 2 and learner.context.device.type == "meta" and len(learner.seen_positions) == 6
    placed = {"meta": [], "cpu": []}
    for name, value in vars(learner).items():
        if name in ("config", "context"):
            continue
        for path, tensor in _tensors_of(value, name, set()):
            expected = "cpu" if name in learner_class.kept_on_host else "meta"
            assert tensor.device.type == expected, f"{method}: {path} is on {tensor.device}, expected {expected}"
            placed[expected].append(path)
    assert placed["meta"], f"{method}: no state on the learner's device"
    if method == "proof":
        assert {"memory_features", "memory_targets"} <= set(placed["cpu"])
        assert len(learner.memory_targets) > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(METHODS))
def test_a_resume_on_the_device_ends_as_an_uninterrupted_run(method_store, tmp_path, monkeypatch, method, device):
    """Interrupted after two tasks and resumed, on the device: the same metrics and the same final checkpoint to the bit
    (on CUDA this needs deterministic sums, and PROOF's exemplars back on the CPU after the load)."""
    assert _run(method_store, tmp_path / "whole", method, *_short(method), device=device) == 0
    learner_class = METHODS[method]
    original = interrupt_at_task(monkeypatch, learner_class, 2)
    assert _run(method_store, tmp_path / "cut", method, *_short(method), device=device) == 130
    monkeypatch.setattr(learner_class, "fit_task", original)
    args = ["run", "--features", str(method_store), "--out", str(tmp_path / "cut"), "--method", method, "--device", device,
            "--resume", *RUN]
    assert main(args + [item for knob in _short(method) for item in ("--set", knob)]) == 0
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
    whole, cut = (torch.load(tmp_path / name / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
                  for name in ("whole", "cut"))
    assert_same_state(cut, whole)


class _FakeCurrentDevice:
    """CUDA's current device as torch keeps it, per thread and 0 until set: torch.cuda.set_device / current_device."""

    def __init__(self):
        self.local = threading.local()

    def set_device(self, device) -> None:
        self.local.index = device if isinstance(device, int) else torch.device(device).index

    def current_device(self) -> int:
        return getattr(self.local, "index", 0)


@pytest.fixture()
def fake_cuda(monkeypatch):
    fake = _FakeCurrentDevice()
    monkeypatch.setattr(torch.cuda, "set_device", fake.set_device)
    monkeypatch.setattr(torch.cuda, "current_device", fake.current_device)
    return fake


@pytest.mark.parametrize("run_device,main_thread_device", [("cuda:1", 0), ("cuda", 2)])
def test_worker_threads_use_the_runs_gpu(fake_cuda, monkeypatch, tmp_path, run_device, main_thread_device):
    """The prefetch thread pins memory and the extraction writer waits on CUDA events: both refer to the thread's current
    device, which starts at GPU 0 in every new thread. Each must run on the run's GPU ('cuda' alone: the one current in
    the thread that starts them)."""
    fake_cuda.set_device(main_thread_device)
    expected = torch.device(run_device).index if torch.device(run_device).index is not None else main_thread_device
    pinned_on = []

    def fake_pin(tensor):
        pinned_on.append(fake_cuda.current_device())
        return tensor

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    arrays = {"global": np.arange(40, dtype=np.float16).reshape(10, 4), "targets": np.arange(10)}
    batches = list(learner_module._prefetched(arrays, np.arange(10), 4, torch.device(run_device)))
    assert [start for start, _ in batches] == [0, 4, 8]
    assert pinned_on and set(pinned_on) == {expected}

    files = {split: extract_module._SplitFiles({"global": (tmp_path / split / "global.npy", (4, 3)),
                                                "patches": (tmp_path / split / "patches.npy", (4, 2, 3))}, "float16")
             for split in SPLITS}
    for split in SPLITS:
        (tmp_path / split).mkdir()
    for split_files in files.values():
        split_files.create()
        split_files.read_offsets()
    waited_on = []
    writer = extract_module._RowWriter(files, tmp_path / "record.json", {split: [] for split in SPLITS}, None,
                                       torch.device(run_device))
    staged = extract_module._Staged({"global": torch.ones(2, 3, dtype=torch.float16),
                                     "patches": torch.ones(2, 2, 3, dtype=torch.float16)},
                                    wait=lambda: waited_on.append(fake_cuda.current_device()))
    writer.submit("train", 0, 2, staged)
    writer.close()
    assert waited_on == [expected]
    assert np.load(tmp_path / "train" / "global.npy")[:2].tolist() == [[1.0] * 3] * 2


def test_class_sums_equal_a_float64_reference_exactly():
    """Per-class sums (a one-hot product in float64, the same bits on every device) against numpy's float64 sums, and the
    float32 means PROOF keeps against the float64 means rounded once; any order of the rows gives the same means."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(300, 24, generator=generator)
    columns = torch.randint(0, 5, (300,), generator=generator)
    columns[columns == 3] = 1  # a class without rows
    sums, counts = class_sums(features, columns, 5)
    reference = np.zeros((5, 24))
    for row, column in zip(features.double().numpy(), columns.tolist()):
        reference[column] += row
    assert sums.dtype == torch.float64 and np.array_equal(sums.numpy(), reference)
    assert counts.tolist() == np.bincount(columns.numpy(), minlength=5).tolist()
    present = counts > 0
    means = (sums[present] / counts[present].unsqueeze(1)).float()
    assert np.array_equal(means.numpy(), (reference[present.numpy()] / counts[present].numpy()[:, None]).astype(np.float32))
    shuffled = torch.randperm(300, generator=generator)
    sums_shuffled, _ = class_sums(features[shuffled], columns[shuffled], 5)
    assert torch.equal((sums_shuffled[present] / counts[present].unsqueeze(1)).float(), means)

    # PROOF's prototypes are those means (of the normalised rows)
    learner = METHODS["proof"](build_config({"method": "proof"}), LearnerContext(24, 0, 50.0, torch.device("cpu")))
    learner.seen_positions = [10, 11, 12, 13, 14]
    learner.prototypes = torch.zeros(5, 24)
    learner._set_prototypes(features, columns + 10)
    unit = torch.nn.functional.normalize(features, dim=-1).double().numpy()
    for column in (0, 1, 4):
        expected = (unit[columns.numpy() == column].sum(axis=0) / (columns == column).sum().item()).astype(np.float32)
        assert np.array_equal(learner.prototypes[column].numpy(), expected)
    assert not learner.prototypes[3].any()


def test_the_local_rank_maps_to_a_visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert local_rank_device(2) == torch.device("cuda", 2)  # every GPU of the node visible
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert local_rank_device(3) == torch.device("cuda", 0)  # the launcher shows each rank its own GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    with pytest.raises(InputError, match=r"LOCAL_RANK=3: this process sees 2 CUDA device\(s\) \(CUDA_VISIBLE_DEVICES=5,6\)"):
        local_rank_device(3)


def test_the_memory_budget_shares_the_gpu_between_sweep_workers(monkeypatch):
    gib = 2**30
    free = {"now": 60 * gib}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["now"], 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv(PROCESSES_PER_GPU_ENV, raising=False)
    assert memory_budget(cuda) == 31 * gib  # alone: half of what is free (the allocator's idle cache counts as free)
    monkeypatch.setenv(PROCESSES_PER_GPU_ENV, "4")
    assert memory_budget(cuda) == 10 * gib  # four workers, each half of its quarter: 40 GiB in all, whoever starts first
    free["now"] = 6 * gib
    assert memory_budget(cuda) == 4 * gib  # never more than half of what is free
    assert memory_budget(cuda, 1.5) == int(1.5 * gib) and memory_budget(torch.device("cpu")) is None
    monkeypatch.setenv(PROCESSES_PER_GPU_ENV, "0")
    with pytest.raises(InputError, match=PROCESSES_PER_GPU_ENV):
        memory_budget(cuda)
    from spacil.sweep.local import worker_env

    shares = [worker_env(slot, 3, ["4", "7"], 16) for slot in range(3)]
    assert [(env["CUDA_VISIBLE_DEVICES"], env[PROCESSES_PER_GPU_ENV]) for env in shares] == [("4", "2"), ("7", "1"), ("4", "2")]


def test_an_upload_that_runs_out_of_device_memory_streams_instead(random_store, monkeypatch, caplog):
    real_copy = learner_module._copy_rows_to_device

    def copy_without_room_for_patches(array, rows, device):
        if len(array.shape) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_copy(array, rows, device)

    monkeypatch.setattr(learner_module, "_copy_rows_to_device", copy_without_room_for_patches)
    data = _task_data(random_store, "resident")
    with caplog.at_level("WARNING"):
        batches = list(data.batches(8, torch.Generator().manual_seed(3)))
    assert set(data._resident) == {"global", "targets"} and "streaming them instead" in caplog.text
    reference = list(_task_data(random_store, "host").batches(8, torch.Generator().manual_seed(3)))
    assert len(batches) == len(reference) == 7
    for mine, theirs in zip(batches, reference):
        assert torch.equal(mine.global_, theirs.global_) and torch.equal(mine.patches, theirs.patches)
        assert torch.equal(mine.targets, theirs.targets)
