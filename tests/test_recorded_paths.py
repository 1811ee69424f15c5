"""Issue 26: paths recorded relative to the file that records them, older cwd-relative ones still read."""

import yaml

from spacil.config import build_config, differing_keys, dump_config
from spacil.recorded_paths import record_data_paths, relative_to, resolve_data_paths, resolve_recorded


def test_a_recorded_path_resolves_against_its_folder_then_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "stores" / "world").mkdir(parents=True)
    run = tmp_path / "runs" / "spa"
    run.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert relative_to("stores/world", run) == "../../stores/world"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert resolve_recorded("../../stores/world", run) == tmp_path / "stores" / "world"  # from any directory
    assert resolve_recorded(str(tmp_path / "x"), run) == tmp_path / "x"  # absolute: as it is
    monkeypatch.chdir(tmp_path)
    assert resolve_recorded("stores/world", run) == tmp_path / "stores" / "world"  # 0.3: from where the command ran
    assert resolve_recorded("gone", run) == run / "gone"  # nothing anywhere: the recorded place, for the error


def test_config_paths_round_trip_and_compare_by_where_they_lead(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = build_config({"data": {"features": "stores/world", "data_root": "data", "pretrained": "ckpt/model.bin"}})
    run = tmp_path / "runs" / "spa"
    run.mkdir(parents=True)
    worker = yaml.safe_load(dump_config(config, absolute=True))  # a sweep worker's config: absolute
    assert worker["data"]["features"] == str(tmp_path / "stores" / "world")
    tree = yaml.safe_load(dump_config(config, folder=run))
    assert tree["data"]["features"] == "../../stores/world" and tree["data"]["data_root"] == "../../data"
    assert tree["data"]["pretrained"] == "ckpt/model.bin"  # a tag or a file: kept as given
    assert resolve_data_paths(tree, run)["data"]["features"] == str(tmp_path / "stores" / "world")
    assert differing_keys(tree, config, folder=run) == []
    monkeypatch.chdir(run)  # the same store named from the run folder
    assert differing_keys(tree, build_config({"data": {"features": "../../stores/world", "data_root": "../../data",
                                                       "pretrained": "ckpt/model.bin"}}), folder=run) == []
    assert differing_keys(tree, build_config({"data": {"features": "other", "data_root": "../../data",
                                                       "pretrained": "ckpt/model.bin"}}), folder=run) == ["data.features"]
    assert record_data_paths({"method": "spa"}, run) == {"method": "spa"}  # no data section: nothing to do
