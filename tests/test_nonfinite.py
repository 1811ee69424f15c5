"""Issue 26: every array a run reads is checked for NaN and infinity once, text arrays and views included."""

from pathlib import Path

import numpy as np
import pytest

from conftest import make_random_store
from spacil.cli import main
from spacil.store.finite import first_nonfinite_index


def _plant(file: Path, index: tuple, value: float) -> None:
    array = np.load(file, mmap_mode="r+")
    array[index] = value
    array.flush()
    del array


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spacil: error: "), err
    return err


def _run(store: Path, out: Path, method: str, *extra: str) -> int:
    return main(["run", "--features", str(store), "--method", method, "--init-cls", "4", "--increment", "4", "--quiet",
                 "--set", "epochs=1", "--out", str(out), *extra])


@pytest.mark.parametrize("rel, index, value, shown", [
    ("text/descriptions.npy", (3, 1, 7), np.nan, "index [3, 1, 7] is NaN"),
    ("text/prompts.npy", (4, 2), np.nan, "index [4, 2] is NaN"),
    ("text/templates.npy", (2, 0, 5), np.inf, "index [2, 0, 5] is inf (infinite)"),
    ("text/template_norms.npy", (5, 1), np.inf, "index [5, 1] is inf (infinite)"),
    ("backbone/visual_proj.npy", (2, 4), -np.inf, "index [2, 4] is -inf (infinite)"),
])
def test_a_non_finite_text_or_model_array_is_exit_2_naming_file_and_index(tmp_path, capsys, rel, index, value, shown):
    store = make_random_store(tmp_path / "store", templates=2, width=20)
    _plant(store / rel, index, value)
    # spa reads neither template norms nor visual.proj, yet the store opens them for the run: checked all the same
    assert _run(store, tmp_path / "run", "spa") == 2
    assert f"{store / rel}: {shown}" in _one_line(capsys)
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything is written


def test_non_finite_pairwise_descriptions_and_views_are_exit_2(tmp_path, capsys):
    engine = ["--set", "engine_epochs=1", "--set", "engine_batch_size=8"]
    store = make_random_store(tmp_path / "store", templates=2, width=20, pairwise=2, views=2)
    _plant(store / "text/pairwise.npy", (1, 2, 0, 3), np.nan)
    assert _run(store, tmp_path / "a", "engine", *engine) == 2
    assert f"{store / 'text/pairwise.npy'}: index [1, 2, 0, 3] is NaN" in _one_line(capsys)
    store = make_random_store(tmp_path / "store2", templates=2, width=20, pairwise=2, views=2)
    _plant(store / "train/views_global.npy", (6, 1, 2), np.nan)  # row 6: a class of the first task
    assert _run(store, tmp_path / "b", "engine", *engine) == 2
    assert f"{store / 'train/views_global.npy'}: row 6 holds NaN or infinite values" in _one_line(capsys)


def test_a_sound_store_runs_and_the_index_is_found_in_every_chunk(tmp_path, monkeypatch):
    import spacil.store.finite as finite

    store = make_random_store(tmp_path / "store", templates=2)
    assert _run(store, tmp_path / "run", "spa") == 0
    monkeypatch.setattr(finite, "CHUNK_BYTES", 8)  # one row per chunk
    for dtype in (np.float16, np.float32, np.float64):
        data = np.zeros((5, 3, 4), dtype=dtype)
        assert first_nonfinite_index(data) is None
        data[3, 2, 1] = np.nan
        data[4, 0, 0] = np.inf
        assert first_nonfinite_index(data) == (3, 2, 1)
        for value in (np.inf, -np.inf):  # an infinity alone (no NaN beside it to mask a wrong exponent mask)
            data = np.zeros((4, 3), dtype=dtype)
            data[2, 1] = value
            assert first_nonfinite_index(data) == (2, 1)
            assert finite.first_nonfinite_row(data) == 2
    assert first_nonfinite_index(np.ones((3, 2), dtype=np.int64)) is None
    assert first_nonfinite_index(np.array([1.0, np.inf], dtype=np.float32)) == (1,)


def test_a_non_finite_view_set_row_names_the_file_it_is_in(tmp_path, capsys):
    """AREA reads its views by name (views_area_augment_pre); the line names the store's file that holds them."""
    store = make_random_store(tmp_path / "store", templates=2, width=20, area=2)
    _plant(store / "train/views_area_augment_global_pre.npy", (5, 1, 3), np.nan)  # row 5: a class of the first task
    area = ["--set", "area_epochs=1", "--set", "area_batch_size=8", "--set", "basis_rank=2",
            "--set", "area_samples_per_class=2"]
    assert _run(store, tmp_path / "run", "area", *area) == 2
    assert f"{store / 'train/views_area_augment_global_pre.npy'}: row 5 holds NaN" in _one_line(capsys)
