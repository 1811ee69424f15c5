"""Sharded extraction with torch.distributed (issue 10): two gloo ranks write one store, byte-identical to one process,
also when a rank is killed and the command run again (with the same or another world size)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spacil.cli import main

KILLER = Path(__file__).resolve().parent / "_rank_killer.py"


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _extract_args(tiny_model, shapes_root, out, device: str = "cpu") -> list[str]:
    return ["extract", "--dataset", "shapes", "--data-root", str(shapes_root), "--model", tiny_model, "--pretrained", "",
            "--batch-size", "4", "--device", device, "--quiet", "--out", str(out)]


def _torchrun(args: list[str], kill_rank: int | None = None) -> int:
    target = [str(KILLER)] if kill_rank is not None else ["-m", "spacil"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--monitor-interval", "0.1", *target, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPACIL_TEST_KILL_RANK": str(kill_rank)}
    return subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300).returncode


def _single_process(tiny_model, shapes_root, out, device: str = "cpu") -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank runs (OMP_NUM_THREADS=1)
    try:
        assert main(_extract_args(tiny_model, shapes_root, out, device)) == 0
    finally:
        torch.set_num_threads(threads)
    return _files(out)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL, one per rank)"))])
def test_two_ranks_write_the_single_process_store(tiny_model, shapes_root, tmp_path, device):
    whole = _single_process(tiny_model, shapes_root, tmp_path / "whole", device)
    assert _torchrun(_extract_args(tiny_model, shapes_root, tmp_path / "sharded", device)) == 0
    assert _files(tmp_path / "sharded") == whole


def test_a_killed_rank_resumes_with_another_then_the_same_world_size(tiny_model, shapes_root, tmp_path):
    """Rank 1 dies after its first batch (torchrun then stops rank 0); one process does one more batch; two ranks finish."""
    from spacil.store.extract import extract_store

    whole = _single_process(tiny_model, shapes_root, tmp_path / "whole")
    out = tmp_path / "killed"
    assert _torchrun(_extract_args(tiny_model, shapes_root, out), kill_rank=1) != 0
    assert not (out / "meta.json").exists() and (out / ".progress.rank1.json").exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract_store("shapes", shapes_root, out, model=tiny_model, pretrained=None, batch_size=4, device="cpu",
                      max_batches=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert not (out / "meta.json").exists()
    assert _torchrun(_extract_args(tiny_model, shapes_root, out)) == 0
    assert _files(out) == whole
