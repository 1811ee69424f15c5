"""Issue 26: `spacil report runs/*` skips unfinished runs and what is not a run folder, one line each; exit 2 only when
nothing is left."""

from conftest import make_random_store
from spacil.cli import main


def test_report_of_a_glob_skips_unfinished_runs_and_foreign_paths(tmp_path, capsys):
    store = make_random_store(tmp_path / "store", num_classes=6, dim=8, num_patches=4, train=4, test=2)
    runs = tmp_path / "runs"
    assert main(["run", "--features", str(store), "--method", "simplecil", "--init-cls", "3", "--increment", "3",
                 "--quiet", "--out", str(runs / "simplecil")]) == 0
    unfinished = runs / "spa"  # started, killed before its first task ended: config.yaml and log.txt, no summary
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("method: spa\n")
    (unfinished / "log.txt").write_text("")
    (runs / "notes").mkdir()
    (runs / "notes.txt").write_text("a file beside the runs\n")
    capsys.readouterr()
    glob = sorted(str(p) for p in runs.iterdir())
    assert main(["report", *glob, "--out", str(tmp_path / "report")]) == 0
    captured = capsys.readouterr()
    assert sorted(captured.err.splitlines()) == [f"skipped (not a run folder): {runs / 'notes'}",
                                                 f"skipped (not a run folder): {runs / 'notes.txt'}",
                                                 f"skipped (unfinished run): {unfinished}"]
    assert "simplecil" in captured.out and (tmp_path / "report" / "report.md").is_file()
    assert main(["report", str(unfinished), str(runs / "notes")]) == 2  # nothing left to report
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == [f"skipped (unfinished run): {unfinished}", f"skipped (not a run folder): {runs / 'notes'}"]
    assert len(err) == 3 and err[2].startswith("spacil: error: nothing to report")


def test_a_second_report_of_the_same_glob_passes_over_the_first_reports_files(tmp_path, capsys):
    """Without --out a report goes into the runs' parent, which `runs/*` names the next time: its own files are passed
    over without a line; any other file still gets one."""
    store = make_random_store(tmp_path / "store", num_classes=6, dim=8, num_patches=4, train=4, test=2)
    runs = tmp_path / "runs"
    assert main(["run", "--features", str(store), "--method", "simplecil", "--init-cls", "3", "--increment", "3",
                 "--quiet", "--out", str(runs / "simplecil")]) == 0
    assert main(["report", str(runs / "simplecil")]) == 0
    assert {"report.md", "report.csv", "curves.png"} <= {p.name for p in runs.iterdir()}
    (runs / "notes.txt").write_text("a file beside the runs\n")
    capsys.readouterr()
    assert main(["report", *sorted(str(p) for p in runs.iterdir())]) == 0
    assert capsys.readouterr().err.splitlines() == [f"skipped (not a run folder): {runs / 'notes.txt'}"]
