import json

from spacil.cli import main
from spacil.demo.run import RUNS


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "| spa |" in printed and "image-level path" in printed
    table = (out / "demo_table.md").read_text().strip("\n")  # the file the README's table is made from
    assert table in printed and table in (out / "report.md").read_text() and len(table.splitlines()) == 2 + len(RUNS)
    for picture in ("curves.png", "matrix_spa.png", "patch_selection.png"):
        assert (out / picture).stat().st_size > 10_000
    summaries = {name: json.loads((out / "runs" / name / "summary.json").read_text()) for name, _, _ in RUNS}
    chance = 100 / 10  # the first task has 10 classes; later ones more
    spa = summaries["spa"]["avg_acc"]
    # what docs/demo.md says the world rewards: SPA leads, global-only methods are well above chance but behind
    for baseline in ("zeroshot", "simplecil", "finetune", "rapf", "spa_global_only", "spa_random_patches", "spa_template_tokens",
                     "proof_20_exemplars_per_class"):
        assert spa > summaries[baseline]["avg_acc"], baseline
    assert summaries["simplecil"]["avg_acc"] > 3 * chance
    image = json.loads((out / "image_path" / "runs" / "image_spa" / "summary.json").read_text())
    assert image["complete"] and len(image["curve"]) == 2
    explained = json.loads((out / "image_path" / "explain" / "test_5.json").read_text())  # spacil explain of one image
    assert explained["method"] == "spa" and explained["explained"] and (out / "image_path" / "explain" / "test_5.png").is_file()
    # run again: everything finished is reused (its run folders record the world relative to themselves: issue 26)
    written = {path: path.stat().st_mtime_ns for path in (out / "runs").glob("*/summary.json")}
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    assert written == {path: path.stat().st_mtime_ns for path in (out / "runs").glob("*/summary.json")}


def test_report_over_runs(random_store, tmp_path, capsys):
    runs = []
    for method in ("simplecil", "spa"):
        run = tmp_path / "runs" / method
        assert main(["run", "--features", str(random_store), "--method", method, "--init-cls", "6", "--increment", "3",
                     "--set", "epochs=1", "--out", str(run), "--quiet"]) == 0
        runs.append(str(run))
    capsys.readouterr()
    assert main(["report", *runs, "--out", str(tmp_path / "report")]) == 0
    table = capsys.readouterr().out
    assert "| simplecil | random | B6 Inc3 |" in table and "| spa | random | B6 Inc3 |" in table
    assert "seeds" not in table  # one seed for all: no seed columns
    csv = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert csv[0].startswith("method,data,split,seed,avg acc,last acc,forgetting") and len(csv) == 3
    assert (tmp_path / "report" / "curves.png").is_file() and (tmp_path / "report" / "matrix_spa.png").is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 2


def _sync_docs():
    """benchmarks/sync_docs.py, the one mechanism that writes every benchmark figure into the docs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sync_docs.py"
    spec = importlib.util.spec_from_file_location("sync_docs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_quote_exactly_what_the_benchmarks_wrote():
    """README's demo table is the table a full `spacil demo` wrote (docs/benchmarks/demo_table.md, published by
    benchmarks/bench_demo.py), and every marked figure equals its docs/benchmarks/*.json value."""
    sync = _sync_docs()
    readme = sync.ROOT / "README.md"
    assert "<!-- demo-table -->" in readme.read_text() and "<!-- fig demo.json seconds" in readme.read_text()
    stale = [f"{path.name}: {line}" for path in sync.documents() for line in sync.stale_blocks(path.read_text())]
    assert stale == [], "\n".join(stale + ["regenerate: python benchmarks/bench_demo.py"])


def test_the_published_demo_table_has_a_row_for_every_demo_run():
    """A run added to demo.RUNS (a new method) without rerunning benchmarks/bench_demo.py fails here."""
    import torch

    from spacil.config import build_config
    from spacil.demo.run import DEMO_OVERRIDES, _merge
    from spacil.learner import LearnerContext
    from spacil.methods import create_learner

    context = LearnerContext(dim=4, num_patches=1, logit_scale=1.0, device=torch.device("cpu"))
    labels = [create_learner(build_config(_merge(_merge(DEMO_OVERRIDES, {"method": method}), extra)), context).label
              for _, method, extra in RUNS]
    table = _sync_docs().DEMO_TABLE.read_text().splitlines()[2:]
    assert [row.split(" | ")[0].lstrip("| ") for row in table] == labels


def test_a_stale_figure_or_table_is_named(tmp_path):
    sync = _sync_docs()
    (tmp_path / "demo_table.md").write_text("| method |\n| --- |\n| spa |\n")
    (tmp_path / "demo.json").write_text(json.dumps({"seconds": 41.7, "avg_acc": {"spa": 95.16}, "times": [3, 1, 2]}))
    text = ("<!-- demo-table -->\n| method |\n| --- |\n| old |\n<!-- /demo-table -->\n"
            "<!-- fig demo.json seconds .0f -->36<!-- /fig --> s, <!-- fig demo.json avg_acc.spa .1f -->95.2<!-- /fig -->, "
            "<!-- fig demo.json times|median|*1000 .0f -->2000<!-- /fig --> ms")
    stale = sync.stale_blocks(text, tmp_path)
    assert len(stale) == 2 and "demo table" in stale[0] and "'36', the file says '42'" in stale[1]
    fixed = sync.synced(text, tmp_path)
    assert "| spa |" in fixed and ">42<" in fixed and sync.stale_blocks(fixed, tmp_path) == []
