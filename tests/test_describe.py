import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_server import LLMServer
from spacil.cli import main
from spacil.describe.descriptions import load_descriptions

CLASSES = ["red square", "green circle", "blue triangle", "yellow cross"]


def _args(shapes_root, tiny_model, out, server, *extra):
    return ["describe", "--dataset", "shapes", "--data-root", str(shapes_root), "--out", str(out), "--base-url", server.base_url,
            "--api-key-env", "SPACIL_TEST_KEY", "--clip-model", tiny_model, "--pretrained", "", "--num-descriptions", "4",
            "--visual-samples", "3", "--quiet", *extra]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("SPACIL_TEST_KEY", "test-key")


def test_describe_writes_a_validated_file_and_never_asks_twice(shapes_root, tiny_model, tmp_path):
    out = tmp_path / "descriptions.json"
    with LLMServer({"blue triangle": ["numbered"]}) as server:
        assert main(_args(shapes_root, tiny_model, out, server)) == 0
        assert sorted(cls for cls, _, _ in server.requests) == sorted(CLASSES)
        result = load_descriptions(out)
        assert list(result.classes) == CLASSES and not result.failed
        for name, entry in result.classes.items():
            assert len(entry["descriptions"]) == 4 and len(set(entry["descriptions"])) == 4
            assert len(entry["sample_ids"]) == 3 and all(s.startswith("shapes/train/") for s in entry["sample_ids"])
            assert Path(entry["grid"]).is_file() and entry["cache_key"]
        assert result.classes["blue triangle"]["descriptions"][0] == "blue triangle detail number one with a distinct texture"
        assert result.usage["total_tokens"] == 4 * 120 and result.model == "gpt-5" and result.prompt_version
        raw = json.loads(out.read_text())
        assert raw["format"] == "spacil-descriptions" and raw["version"] == 1
        assert main(_args(shapes_root, tiny_model, out, server)) == 0
        assert len(server.requests) == 4  # everything was cached


def test_faults_are_retried(shapes_root, tiny_model, tmp_path):
    script = {"red square": ["429", "ok"], "green circle": ["500", "500", "ok"], "blue triangle": ["slow", "ok"],
              "yellow cross": ["malformed", "ok"]}
    with LLMServer(script, slow_seconds=3.0) as server:
        assert main(_args(shapes_root, tiny_model, tmp_path / "d.json", server, "--timeout", "1", "--max-concurrency", "2")) == 0
        assert server.calls("red square") == ["429", "ok"]
        first, second = server.times("red square")
        assert second - first >= 0.95  # Retry-After: 1 was honoured
        assert server.calls("green circle") == ["500", "500", "ok"]
        assert server.calls("blue triangle") == ["slow", "ok"]  # timed out, then asked again
        assert server.calls("yellow cross") == ["malformed", "ok"]  # failed validation, asked again
    result = load_descriptions(tmp_path / "d.json")
    assert not result.failed and result.classes["yellow cross"]["attempts"] == 2


def test_answers_that_never_validate_are_reported_not_truncated(shapes_root, tiny_model, tmp_path, capsys):
    with LLMServer({"red square": ["empty"], "green circle": ["long"]}) as server:
        code = main(_args(shapes_root, tiny_model, tmp_path / "d.json", server, "--max-attempts", "2", "--classes",
                          "red square", "green circle", "blue triangle"))
        assert code == 1
        assert server.calls("red square") == ["empty", "empty"]
    result = load_descriptions(tmp_path / "d.json")
    assert set(result.failed) == {"red square", "green circle"}
    assert "77 tokens" in result.failed["green circle"] and "got 0" in result.failed["red square"]
    assert list(result.classes) == ["blue triangle"]


def test_missing_key_fails_before_any_work(shapes_root, tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SPACIL_TEST_KEY")
    with LLMServer() as server:
        assert main(_args(shapes_root, tiny_model, tmp_path / "d.json", server)) == 2
        assert server.requests == []
    err = capsys.readouterr().err
    assert "SPACIL_TEST_KEY" in err and err.count("\n") == 1
    assert not (tmp_path / "d.json").exists()


def test_killed_run_resumes_without_paying_twice(shapes_root, tiny_model, tmp_path):
    out = tmp_path / "d.json"
    env = {**os.environ, "SPACIL_TEST_KEY": "k", "OMP_NUM_THREADS": "1"}
    with LLMServer({"yellow cross": ["hang", "ok"]}) as server:
        command = [sys.executable, "-m", "spacil"] + _args(shapes_root, tiny_model, out, server, "--max-concurrency", "1")
        process = subprocess.Popen(command, env=env)
        deadline = time.time() + 60
        while time.time() < deadline and server.calls("yellow cross") == []:
            time.sleep(0.05)
        time.sleep(0.3)
        process.kill()
        process.wait()
        done = load_descriptions(out)
        assert list(done.classes) == ["red square", "green circle", "blue triangle"]
        assert subprocess.run(command, env=env).returncode == 0
        for name in ("red square", "green circle", "blue triangle"):
            assert len(server.calls(name)) == 1  # answered before the kill: never asked again
        assert server.calls("yellow cross") == ["hang", "ok"]
    assert list(load_descriptions(out).classes) == CLASSES


def test_llm_none_writes_template_descriptions(shapes_root, tmp_path, monkeypatch):
    monkeypatch.delenv("SPACIL_TEST_KEY")
    out = tmp_path / "t.json"
    assert main(["describe", "--dataset", "shapes", "--data-root", str(shapes_root), "--out", str(out), "--llm", "none", "--quiet"]) == 0
    result = load_descriptions(out)
    assert result.source == "templates"
    assert result.classes["red square"]["descriptions"] == ["a photo of a red square.", "a drawing of a red square."]


def test_concurrent_requests_are_capped(shapes_root, tiny_model, tmp_path):
    script = {name: ["slow"] for name in CLASSES}
    with LLMServer(script, slow_seconds=0.8) as server:
        assert main(_args(shapes_root, tiny_model, tmp_path / "d.json", server, "--max-concurrency", "2")) == 0
        assert server.peak_in_flight == 2
    with LLMServer(script, slow_seconds=0.3) as server:
        assert main(_args(shapes_root, tiny_model, tmp_path / "e.json", server, "--max-concurrency", "1")) == 0
        assert server.peak_in_flight == 1


def test_describe_takes_its_defaults_from_a_config(shapes_root, tiny_model, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("spa: {num_descriptions: 3, visual_samples: 2, sample_strategy: fps}\nllm: {max_attempts: 1}\n")
    out = tmp_path / "d.json"
    with LLMServer(count=3) as server:
        base = ["describe", "--dataset", "shapes", "--data-root", str(shapes_root), "--out", str(out), "--base-url",
                server.base_url, "--api-key-env", "SPACIL_TEST_KEY", "--clip-model", tiny_model, "--pretrained", "", "--quiet"]
        assert main(base + ["--config", str(config)]) == 0
        entry = load_descriptions(out).classes["green circle"]
        assert len(entry["descriptions"]) == 3 and len(entry["sample_ids"]) == 2
        assert main(base + ["--config", str(config), "--num-descriptions", "0"]) == 2
    assert "spa.num_descriptions" in capsys.readouterr().err


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_server_is_one_line_naming_the_url(shapes_root, tiny_model, tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/v1"

    class Nowhere:
        base_url = url

    out = tmp_path / "d.json"
    started = time.monotonic()
    code = main(_args(shapes_root, tiny_model, out, Nowhere, "--max-retries", "1"))
    seconds = time.monotonic() - started
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "Traceback" not in captured.err, captured.err
    assert len(list((tmp_path / "d_grids").iterdir())) == 1  # only the first class was prepared and tried
    assert seconds < 60
    assert not out.exists()


def test_rerun_with_another_count_is_refused_and_the_file_kept(shapes_root, tiny_model, tmp_path, capsys):
    out = tmp_path / "d.json"
    with LLMServer() as server:
        assert main(_args(shapes_root, tiny_model, out, server, "--classes", "red square")) == 0
        before = out.read_bytes()
        capsys.readouterr()
        with LLMServer(count=3) as other:
            args = _args(shapes_root, tiny_model, out, other)
            args[args.index("--num-descriptions") + 1] = "3"
            assert main(args) == 2
            assert other.requests == []
        err = capsys.readouterr().err.strip()
        assert "num_descriptions 4 (this run: 3)" in err and "\n" not in err
        assert out.read_bytes() == before
        assert main(_args(shapes_root, tiny_model, out, server, "--model", "other-llm")) == 2
        assert "model 'gpt-5' (this run: 'other-llm')" in capsys.readouterr().err
    template_run = ["describe", "--dataset", "shapes", "--data-root", str(shapes_root), "--out", str(out), "--llm", "none"]
    assert main(template_run) == 2  # template descriptions never replace paid ones
    assert "'llm' descriptions" in capsys.readouterr().err and out.read_bytes() == before
    result = load_descriptions(out)
    assert result.num_descriptions == 4 and all(len(e["descriptions"]) == 4 for e in result.classes.values())


def test_failures_go_to_stderr_even_with_quiet(shapes_root, tiny_model, tmp_path, capsys):
    with LLMServer({"red square": ["empty"]}) as server:
        assert main(_args(shapes_root, tiny_model, tmp_path / "d.json", server, "--max-attempts", "1",
                          "--classes", "green circle", "red square")) == 1
    captured = capsys.readouterr()
    assert "failed: red square: expected 4 descriptions, got 0" in captured.err
    result = load_descriptions(tmp_path / "d.json")
    assert set(result.failed) == {"red square"} and set(result.classes) == {"green circle"}


def test_ctrl_c_saves_the_request_in_flight_and_leaves_unsent_classes_out(shapes_root, tiny_model, tmp_path):
    import signal

    out = tmp_path / "d.json"
    env = {**os.environ, "SPACIL_TEST_KEY": "k", "OMP_NUM_THREADS": "1"}
    with LLMServer({"green circle": ["slow"]}, slow_seconds=3.0) as server:
        assert main(_args(shapes_root, tiny_model, out, server, "--classes", "red square")) == 0
        command = [sys.executable, "-m", "spacil"] + _args(shapes_root, tiny_model, out, server, "--max-concurrency", "1")
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and server.calls("green circle") == []:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 130
        assert "saving the answers of 1 request in flight" in err, err
        assert server.calls("blue triangle") == [] and server.calls("yellow cross") == []
    result = load_descriptions(out)
    assert list(result.classes) == ["red square", "green circle"]  # the answer in flight was saved
    assert result.failed == {}  # classes never sent are not failures


def test_a_kill_at_any_write_of_the_file_ends_as_an_uninterrupted_run(shapes_root, tiny_model, tmp_path, monkeypatch):
    """The file is only ever replaced whole: whichever write a kill stops (leaving a half-written temporary file behind),
    the rerun ends with the file an uninterrupted run writes. Only the total token usage may grow: an answer whose write
    was lost is asked (and paid) again."""
    import spacil.describe.descriptions as descriptions_module

    def normalised(path: Path) -> dict:
        data = json.loads(path.read_text().replace(str(path.parent), "DIR"))
        data.pop("usage")
        return data

    writes = []
    real_write = descriptions_module.atomic_write_text

    def counting(path, text):
        writes.append(path)
        real_write(path, text)

    with LLMServer() as server:
        monkeypatch.setattr(descriptions_module, "atomic_write_text", counting)
        reference = tmp_path / "whole" / "d.json"
        assert main(_args(shapes_root, tiny_model, reference, server)) == 0
        total = len(writes)
        assert total >= 5  # first class, each later class, the final ordered write
        for kill_at in range(1, total + 1):
            count = [0]

            def killed(path, text, kill_at=kill_at, count=count):
                count[0] += 1
                if count[0] == kill_at:  # dies half-way through this write: only a partial temporary file
                    Path(path).with_name(f".{Path(path).name}.tmp").write_text(text[: len(text) // 2])
                if count[0] < kill_at:
                    real_write(path, text)

            out = tmp_path / f"kill_{kill_at}" / "d.json"
            monkeypatch.setattr(descriptions_module, "atomic_write_text", killed)
            main(_args(shapes_root, tiny_model, out, server))
            monkeypatch.setattr(descriptions_module, "atomic_write_text", real_write)
            assert main(_args(shapes_root, tiny_model, out, server)) == 0
            assert normalised(out) == normalised(reference), kill_at
