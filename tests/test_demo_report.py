import json

from spacil.cli import main
from spacil.demo import RUNS


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "| spa |" in printed and "image-level path" in printed
    for picture in ("curves.png", "matrix_spa.png", "patch_selection.png"):
        assert (out / picture).stat().st_size > 10_000
    summaries = {name: json.loads((out / "runs" / name / "summary.json").read_text()) for name, _, _ in RUNS}
    chance = 100 / 10  # the first task has 10 classes; later ones more
    spa = summaries["spa"]["avg_acc"]
    # what docs/demo.md says the world rewards: SPA leads, global-only methods are well above chance but behind
    for baseline in ("zeroshot", "simplecil", "finetune", "spa_global_only", "spa_random_patches", "spa_template_tokens",
                     "proof_20_exemplars_per_class"):
        assert spa > summaries[baseline]["avg_acc"], baseline
    assert summaries["simplecil"]["avg_acc"] > 3 * chance
    image = json.loads((out / "image_path" / "runs" / "image_spa" / "summary.json").read_text())
    assert image["complete"] and len(image["curve"]) == 2
    # run again: everything finished is reused
    assert main(["demo", "--out", str(out), "--quick"]) == 0


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
    assert "| simplecil | random |" in table and "| spa | random |" in table
    csv = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert csv[0].startswith("method,data,avg acc,last acc,forgetting") and len(csv) == 3
    assert (tmp_path / "report" / "curves.png").is_file() and (tmp_path / "report" / "matrix_spa.png").is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 2
