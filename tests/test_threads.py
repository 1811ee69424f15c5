"""CPU threads are decided in one place (spacil.devices.cpu_threads) where work starts, and only where the user set none."""

from __future__ import annotations

import pytest
import torch

from spacil import devices
from spacil.cli import main
from spacil.devices import LARGE_WORK_ELEMENTS, choose_cpu_threads, cpu_threads, threads_set_by_user, usable_cores


@pytest.fixture()
def unset_threads(monkeypatch):
    """No thread setting by the user: no OMP/MKL variables, torch at its default (one thread per usable core)."""
    for name in devices.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(usable_cores())
    yield
    torch.set_num_threads(before)


def test_small_work_runs_on_one_thread_large_work_on_every_core():
    assert choose_cpu_threads(49 * 64, cores=2) == 1  # the demo world: one thread is as fast, and never collapses
    assert choose_cpu_threads(9 * 16, cores=16) == 1  # the tests' stores
    assert choose_cpu_threads(196 * 512, cores=2) == 2  # ViT-B/16's patches
    assert choose_cpu_threads(LARGE_WORK_ELEMENTS, cores=16) == 16
    assert choose_cpu_threads(LARGE_WORK_ELEMENTS) == usable_cores()


def test_the_choice_applies_inside_and_the_previous_count_comes_back(unset_threads):
    assert threads_set_by_user() is None
    with cpu_threads(10) as chosen:
        assert chosen == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == usable_cores()
    with cpu_threads(LARGE_WORK_ELEMENTS) as chosen:
        assert chosen == usable_cores() == torch.get_num_threads()


@pytest.mark.parametrize("how", ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "torch.set_num_threads"])
def test_a_thread_count_set_by_the_user_is_kept(unset_threads, monkeypatch, how):
    if how == "torch.set_num_threads":
        torch.set_num_threads(max(devices.torch_default_threads()) + 1)
    else:
        monkeypatch.setenv(how, "3")
    before = torch.get_num_threads()
    assert how in threads_set_by_user()
    with cpu_threads(10) as chosen:
        assert chosen == before == torch.get_num_threads()
    assert torch.get_num_threads() == before


def test_a_run_computes_with_the_chosen_threads(unset_threads, random_store, tmp_path, monkeypatch):
    from spacil.methods.simplecil import SimpleCIL

    seen = []
    original = SimpleCIL.fit_task

    def recording(self, data):
        seen.append(torch.get_num_threads())
        return original(self, data)

    monkeypatch.setattr(SimpleCIL, "fit_task", recording)
    assert main(["run", "--features", str(random_store), "--method", "simplecil", "--init-cls", "6", "--increment", "6",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert seen == [1, 1]  # a tiny store: one thread
    assert torch.get_num_threads() == usable_cores()  # given back when the run ends


def test_a_sweep_worker_chooses_within_its_share_of_the_cores(unset_threads, monkeypatch):
    from spacil.errors import InputError
    from spacil.sweep.local import worker_env

    env = worker_env(0, 2, [], 16)
    assert env[devices.CPU_SHARE_ENV] == "8" and "OMP_NUM_THREADS" not in env  # the worker's run still decides
    monkeypatch.setenv(devices.CPU_SHARE_ENV, "1")
    assert usable_cores() == 1 and choose_cpu_threads(LARGE_WORK_ELEMENTS) == 1
    monkeypatch.setenv(devices.CPU_SHARE_ENV, "zero")
    with pytest.raises(InputError, match=devices.CPU_SHARE_ENV):
        usable_cores()
