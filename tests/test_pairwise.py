"""Pairwise descriptions: the store layout (store/pairwise.py) and `spacil describe --pairwise` (describe/pairwise.py)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from spacil.config import LLMConfig
from spacil.describe.descriptions import import_descriptions
from spacil.describe.pairwise import describe_pairwise, parse_pairwise_answer
from spacil.errors import InputError
from spacil.store.pairwise import PairwiseTexts, pairwise_features, pairwise_strings, read_pairwise


def test_read_and_encode_pairwise(tmp_path):
    file = tmp_path / "des.json"
    file.write_text(json.dumps({"Red_Fox": {"red fox": ["A general one."], "wolf": ["Smaller body.", "Orange Fur."]},
                                "Wolf": {"red_fox": ["Bigger body."]}, "unknown": {"wolf": ["x"]}}))
    names = ["wolf", "red fox", "owl"]
    pairs = read_pairwise(file, names)
    assert pairs == {(1, 1): ["A general one."], (1, 0): ["Smaller body.", "Orange Fur."], (0, 1): ["Bigger body."]}
    assert pairwise_strings(names, pairs)[(1, 0)] == ["red fox with smaller body.", "red fox with orange fur."]
    rng = np.random.default_rng(0)
    cache = {}

    def encode(texts):
        raw = np.stack([cache.setdefault(t, rng.normal(size=4) * 3) for t in texts])
        lengths = np.linalg.norm(raw, axis=-1)
        return raw / lengths[:, None], lengths

    units, norms, mask = pairwise_features(encode, names, pairs, dim=4, batch=2)
    assert units.shape == (3, 3, 2, 4) and mask.sum() == 4 and mask[1, 0].all() and not mask[0, 0].any()
    raw = cache["red fox with orange fur."]
    assert np.allclose(units[1, 0, 1] * norms[1, 0, 1], raw, atol=1e-5)
    assert np.allclose(np.linalg.norm(units[mask], axis=-1), 1, atol=1e-5)
    features, counts = PairwiseTexts(units, norms, mask).block([1, 0])  # seen order: red fox, then wolf
    assert counts.tolist() == [[1, 2], [1, 0]]
    assert np.allclose(features[0, 1, 1], raw, atol=1e-5)
    with pytest.raises(InputError, match="none of its class names"):
        read_pairwise(file, ["cat"])
    # the same file is what `descriptions import --format engine` reads
    imported, _ = import_descriptions("engine", file, 3)
    assert imported.classes["Red_Fox"]["descriptions"][0] == "A general one."


def test_parse_pairwise_answer():
    text = "**Red fox:**\n1. Orange fur.\n2) Thin legs.\nWolf:\n1. Grey fur.\n"
    assert parse_pairwise_answer(text, "Red fox", "wolf") == ((["Orange fur.", "Thin legs."], ["Grey fur."]), "")
    assert parse_pairwise_answer("Red fox:\n1. x\n", "Red fox", "wolf")[0] is None
    assert parse_pairwise_answer("", "a", "b")[1] == "empty answer"


class _PairServer:
    """A local chat-completions server answering ENGINE's pairwise question; `bad` pairs get an unparsable answer."""

    def __init__(self, bad=()):
        self.bad = set(bad)
        self.prompts = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                server.prompts.append(prompt)
                first, second = re.findall(r"tell a (.+?) from a (.+?) in a photo \(", prompt)[-1]
                content = "nothing useful" if (first, second) in server.bad else \
                    f"{first}:\n1. {first} shape.\n2. {first} colour.\n{second}:\n1. {second} shape.\n"
                data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                   "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                                "finish_reason": "stop"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_describe_pairwise_writes_engine_format_and_resumes(tmp_path):
    server = _PairServer(bad={("ant", "cat")})
    try:
        llm = LLMConfig(base_url=server.base_url, max_attempts=2, max_concurrency=2)
        out = tmp_path / "pairs.json"
        failed = describe_pairwise(["ant", "bee", "cat"], out, llm, "insects", progress=False, api_key="k")
        assert set(failed) == {("ant", "cat")} and len(server.prompts) == 2 + 2  # the failing pair asked twice
        table = json.loads(out.read_text())
        assert table["ant"]["bee"] == ["ant shape.", "ant colour."] and table["bee"]["ant"] == ["bee shape."]
        assert "cat" not in table.get("ant", {})
        server.bad.clear()
        assert describe_pairwise(["ant", "bee", "cat"], out, llm, "insects", progress=False, api_key="k") == {}
        assert len(server.prompts) == 5  # only the missing pair was asked again
        pairs = read_pairwise(out, ["ant", "bee", "cat"])
        assert pairs[(2, 0)] == ["cat shape."]
    finally:
        server.close()
