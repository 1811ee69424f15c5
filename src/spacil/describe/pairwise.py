"""`spacil describe --pairwise`: ENGINE's pairwise descriptions (`des[a][b]`: visual features of a that tell it from b)
from a text-only LLM, written in ENGINE's JSON format `{A: {B: [sentence, ...]}}` (the format of its released
`chat/<data set>_des.json`, read by `spacil extract --pairwise-descriptions` and `spacil descriptions import --format
engine`).

As the official chat/chatdemo.py `Gene_des`: one request per unordered pair {a, b}, whose answer gives both directions,
des[a][b] and des[b][a]; the prompt (docs/descriptions.md) shows one worked example and asks for numbered features under
each class's name. Same dependability as `spacil describe`: the OpenAI SDK's retries (`llm.max_retries`), at most
`llm.max_concurrency` requests at a time, re-asked while an answer fails to parse (`llm.max_attempts`), every answered
pair written to the file atomically at once, so a rerun asks only for the pairs the file lacks.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Optional, Sequence

from tqdm import tqdm

from spacil.config import LLMConfig
from spacil.errors import InputError
from spacil.fileio import atomic_write_text, read_json

PAIRWISE_PROMPT_VERSION = "engine-pairwise-v1"
PAIRWISE_SYSTEM_PROMPT = "You are a helpful assistant that compares the visual appearance of two categories."

_EXAMPLE = (
    "Q: Which visual features tell a Dog from a Cat in a photo?\n"
    "Dog:\n"
    "1. A larger, heavier body whose size varies widely between breeds.\n"
    "2. A longer muzzle with a broad, wet nose.\n"
    "Cat:\n"
    "1. A small, lithe body with a slender build.\n"
    "2. A short face with a small triangular nose.\n"
)


def build_pairwise_prompt(first: str, second: str, domain: str) -> str:
    return (
        f"{_EXAMPLE}"
        f"Q: Which visual features tell a {first} from a {second} in a photo ({domain})? Give as many features as the two "
        f"really differ by, not necessarily two, in exactly the format of the example and nothing else:\n"
        f"{first}:\n1. ...\n{second}:\n1. ..."
    )


def parse_pairwise_answer(text: Optional[str], first: str, second: str) -> tuple[Optional[tuple[list[str], list[str]]], str]:
    """An answer -> ((features of first, features of second), "") or (None, why it is rejected). Headings `Name:` (case
    and surrounding markup ignored) open a class's list; its items are numbered lines `1. ...`."""
    if not text:
        return None, "empty answer"
    sections: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip().strip("*#").strip()
        if not line:
            continue
        item = re.match(r"^\d+[.)]\s+(.*\S)", line)
        if item and current is not None:
            sections[current].append(item.group(1).strip())
        elif line.endswith(":"):
            current = " ".join(line[:-1].strip("*# ").lower().split())
            sections.setdefault(current, [])
    lists = [sections.get(" ".join(name.lower().split())) for name in (first, second)]
    if first.lower() == second.lower() or any(not items for items in lists):
        return None, f"expected numbered features under '{first}:' and '{second}:'"
    return (lists[0], lists[1]), ""


class PairwiseDescriber:
    """One text request per pair through the OpenAI SDK, re-asked while the answer does not parse."""

    def __init__(self, llm: LLMConfig, api_key: str, domain: str):
        from openai import OpenAI

        self.llm = llm
        self.domain = domain
        self.client = OpenAI(api_key=api_key, base_url=llm.base_url, timeout=llm.timeout, max_retries=llm.max_retries)

    def describe(self, first: str, second: str) -> tuple[Optional[tuple[list[str], list[str]]], str]:
        prompt = build_pairwise_prompt(first, second, self.domain)
        reason = ""
        for _ in range(self.llm.max_attempts):
            text = prompt if not reason else f"{prompt}\nYour previous answer was rejected ({reason}); answer again in exactly that format."
            response = self.client.chat.completions.create(
                model=self.llm.model,
                messages=[{"role": "system", "content": PAIRWISE_SYSTEM_PROMPT}, {"role": "user", "content": text}])
            answer = response.choices[0].message.content if response.choices else None
            parsed, reason = parse_pairwise_answer(answer, first, second)
            if parsed is not None:
                return parsed, ""
        return None, reason


def _load_existing(out: Path) -> dict[str, dict[str, list[str]]]:
    if not out.exists():
        return {}
    data = read_json(out)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise InputError(f"{out}: not ENGINE's pairwise format {{class A: {{class B: [sentences]}}}}; choose another --out")
    return data


def describe_pairwise(names: Sequence[str], out: str | Path, llm: LLMConfig, domain: str,
                      describer: Optional[Callable[[str, str], tuple]] = None, progress: bool = True,
                      api_key: Optional[str] = None) -> dict[tuple[str, str], str]:
    """Ask for every unordered pair of `names` the file `out` lacks; -> {(a, b): why} for the pairs that failed."""
    import os

    out = Path(out)
    table = _load_existing(out)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
             if not (table.get(a, {}).get(b) and table.get(b, {}).get(a))]
    if describer is None and pairs:
        key = api_key if api_key is not None else os.environ.get(llm.api_key_env)
        if not key:
            raise InputError(f"environment variable {llm.api_key_env}: not set (the LLM's API key)")
        describer = PairwiseDescriber(llm, key, domain).describe
    failed: dict[tuple[str, str], str] = {}
    lock = threading.Lock()
    bar = tqdm(total=len(pairs), desc="pairwise descriptions", unit="pair", disable=not progress)

    def ask(pair):
        return pair, describer(*pair)

    try:
        with ThreadPoolExecutor(max_workers=llm.max_concurrency) as pool:
            for future in as_completed([pool.submit(ask, pair) for pair in pairs]):
                (a, b), (parsed, reason) = future.result()
                with lock:
                    if parsed is None:
                        failed[(a, b)] = reason
                        print(f"spacil: pair '{a}' / '{b}': {reason}", file=sys.stderr)
                    else:
                        table.setdefault(a, {})[b] = parsed[0]
                        table.setdefault(b, {})[a] = parsed[1]
                        atomic_write_text(out, json.dumps(table, indent=1, ensure_ascii=False, sort_keys=True))
                    bar.update(1)
    finally:
        bar.close()
    if not out.exists():
        atomic_write_text(out, json.dumps(table, indent=1, ensure_ascii=False, sort_keys=True))
    return failed
