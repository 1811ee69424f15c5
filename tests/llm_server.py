"""A local OpenAI-compatible chat-completions server for the tests, on 127.0.0.1 only.

Each request's class is read from the prompt (`class "NAME"`); a script maps a class to the actions of its successive
requests (the last one repeats): ok, 429 (with Retry-After), 500, slow (answers after `slow_seconds`), hang (answers after
a minute), malformed, empty, long (a description over CLIP's 77 tokens). Every request is logged with its time.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LLMServer:
    def __init__(self, script: dict[str, list[str]] | None = None, count: int = 4, slow_seconds: float = 2.0):
        self.script = script or {}
        self.count = count
        self.slow_seconds = slow_seconds
        self.requests: list[tuple[str, float, str]] = []  # (class, time, action)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.in_flight += 1
                    server.peak_in_flight = max(server.peak_in_flight, server.in_flight)
                try:
                    server.handle(self, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def calls(self, name: str) -> list[str]:
        return [action for cls, _, action in self.requests if cls == name]

    def times(self, name: str) -> list[float]:
        return [t for cls, t, _ in self.requests if cls == name]

    def handle(self, handler, body: dict) -> None:
        text = next(part["text"] for part in body["messages"][-1]["content"] if part["type"] == "text")
        assert any(part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
                   for part in body["messages"][-1]["content"])
        name = re.search(r'(?:class|photo of a) "([^"]+)"', text).group(1)  # spacil's prompt, AREA's prompt
        with self.lock:
            index = len(self.calls(name))
            actions = self.script.get(name, ["ok"])
            action = actions[min(index, len(actions) - 1)]
            self.requests.append((name, time.monotonic(), action))
        if action == "429":
            return self._send(handler, 429, {"error": {"message": "rate limited", "type": "rate_limit"}}, {"Retry-After": "1"})
        if action == "500":
            return self._send(handler, 500, {"error": {"message": "boom", "type": "server_error"}})
        if action == "slow":
            time.sleep(self.slow_seconds)
        if action == "hang":
            time.sleep(60)
        lines = [f"{name} detail number {word} with a distinct texture" for word in ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")[: self.count]]
        content = "\n".join(lines)
        if action == "malformed":
            content = "Sure! Here are some:\n1. " + lines[0] + "\n2. " + lines[0]
        elif action == "empty":
            content = ""
        elif action == "long":
            content = "\n".join(lines[:-1] + [" ".join(["feather"] * 90)])
        elif action == "numbered":
            content = "\n".join(f"{i + 1}. {line}" for i, line in enumerate(lines))
        self._send(handler, 200, {
            "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
        })

    @staticmethod
    def _send(handler, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout under test)
