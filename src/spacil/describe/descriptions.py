"""Class-wise semantic descriptions (SPEC.md section 2): the descriptions file, its validation, and imports of public sets.

The descriptions file (JSON, written atomically) is versioned:

    {"format": "spacil-descriptions", "version": 1, "dataset": KEY, "source": "llm" | "area" | "json" | "engine" | "templates",
     "model": ..., "prompt_version": ..., "num_descriptions": M,
     "classes": {name: {"descriptions": [...], "sample_ids": [...], "grid": path, "cache_key": ..., "usage": {...},
                        "attempts": n}},
     "failed": {name: reason}, "usage": {"prompt_tokens": n, "completion_tokens": n, "total_tokens": n}}

A plain JSON object `{class name: [sentence, ...]}` (CuPL's format) is read as well.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from spacil.data import clean_class_name, normalise_name
from spacil.errors import InputError
from spacil.fileio import atomic_write_text, make_dirs, read_json

FORMAT = "spacil-descriptions"
VERSION = 1
CONTEXT_LENGTH = 77  # CLIP's text context, start and end tokens included


@dataclass
class DescriptionSet:
    """An in-memory descriptions file."""

    dataset: Optional[str] = None
    source: str = "json"
    model: Optional[str] = None
    prompt_version: Optional[str] = None
    num_descriptions: Optional[int] = None
    classes: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})

    @property
    def sentences(self) -> dict[str, list[str]]:
        return {name: list(entry["descriptions"]) for name, entry in self.classes.items()}

    def for_classes(self, names: Sequence[str]) -> dict[str, list[str]]:
        """Sentences keyed by the given class names, matched case- and underscore-insensitively."""
        by_norm = {normalise_name(n): s for n, s in self.sentences.items()}
        return {name: by_norm[normalise_name(name)] for name in names if normalise_name(name) in by_norm}

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "dataset": self.dataset,
            "source": self.source,
            "model": self.model,
            "prompt_version": self.prompt_version,
            "num_descriptions": self.num_descriptions,
            "classes": self.classes,
            "failed": self.failed,
            "usage": self.usage,
        }

    def save(self, path: str | Path) -> None:
        make_dirs(Path(path).parent)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False))


def chosen_classes(names: Sequence[str], classes: Optional[Sequence[str]], dataset: str) -> list[int]:
    """The indices of `classes` (`--classes`) among the data set's `names`, all of them when none are given; a name the
    data set lacks is an InputError."""
    if not classes:
        return list(range(len(names)))
    lookup = {n: i for i, n in enumerate(names)}
    missing = [c for c in classes if c not in lookup]
    if missing:
        raise InputError(f"--classes: '{missing[0]}' is not a class of {dataset}")
    return [lookup[c] for c in classes]


def load_descriptions(path: str | Path) -> DescriptionSet:
    """Read a descriptions file (or a CuPL-style `{class: [sentences]}` object); any fault is an InputError naming the file
    and the key."""
    path = Path(path)
    data = read_json(path)
    if data.get("format") == FORMAT:
        if data.get("version") != VERSION:
            raise InputError(f"{path}: descriptions version {data.get('version')!r} not supported (expected {VERSION})")
        classes = data.get("classes") or {}
        if not isinstance(classes, dict):
            raise InputError(f"{path}: 'classes' must be an object {{class name: entry}}")
        for name, entry in classes.items():
            if not isinstance(entry, dict) or not _strings(entry.get("descriptions")):
                raise InputError(f"{path}: classes.{name}: expected an object whose 'descriptions' is a list of strings")
            _refuse_blank(entry["descriptions"], path, f"classes.{name}.descriptions")
        failed = data.get("failed") or {}
        if not isinstance(failed, dict) or not all(isinstance(v, str) for v in failed.values()):
            raise InputError(f"{path}: 'failed' must be an object {{class name: reason}}")
        usage = data.get("usage") or {}
        if not isinstance(usage, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in usage.values()):
            raise InputError(f"{path}: 'usage' must be an object of token counts (integers)")
        count = data.get("num_descriptions")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise InputError(f"{path}: 'num_descriptions' is {count!r}, expected an integer >= 1")
        for key in ("dataset", "source", "model", "prompt_version"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise InputError(f"{path}: '{key}' is {data[key]!r}, expected a string")
        return DescriptionSet(
            dataset=data.get("dataset"), source=data.get("source") or "json", model=data.get("model"),
            prompt_version=data.get("prompt_version"), num_descriptions=count, classes=classes,
            failed=dict(failed), usage=dict(usage),
        )
    if all(_strings(v) for v in data.values()):
        for name, sentences in data.items():
            _refuse_blank(sentences, path, name)
        return DescriptionSet(source="json", classes={n: {"descriptions": list(v)} for n, v in data.items()})
    raise InputError(f"{path}: neither a spacil descriptions file nor a JSON object {{class: [sentences]}}")


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(s, str) for s in value)


def _refuse_blank(sentences: Sequence[str], path: Path, where: str) -> None:
    """A blank description would be embedded as a 'real' one (CLIP encodes the empty text too): refused, not dropped."""
    for index, sentence in enumerate(sentences):
        if not sentence.strip():
            raise InputError(f"{path}: {where}[{index}]: a blank description ({sentence!r}); remove it or write one")


# ----------------------------------------------------------------------------------------------------------------------
# Validation of one class's answer


def default_token_counter() -> Callable[[str], int]:
    """CLIP's BPE tokenizer (bundled with open_clip, no download): tokens of a text including start and end."""
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    return lambda text: len(tokenizer.encode(text)) + 2


_BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d{1,2}[.):]|\(?[a-zA-Z][.)])\s+")


def parse_answer(text: Optional[str]) -> list[str]:
    """An LLM answer -> candidate descriptions: one per non-empty line, list markers and wrapping quotes removed."""
    lines = []
    for raw in (text or "").splitlines():
        line = _BULLET.sub("", raw).strip().strip('"').strip()
        if line:
            lines.append(line)
    return lines


def validate_descriptions(lines: Sequence[str], expected: int, count_tokens: Callable[[str], int]) -> Optional[str]:
    """None when the answer is usable as it is; otherwise why not (never fixed up by truncation)."""
    if len(lines) != expected:
        return f"expected {expected} descriptions, got {len(lines)}"
    if any(not line.strip() for line in lines):
        return "an empty description"
    seen = set()
    for line in lines:
        key = normalise_name(line).rstrip(".")
        if key in seen:
            return f"duplicate description: {line!r}"
        seen.add(key)
    for line in lines:
        tokens = count_tokens(line)
        if tokens > CONTEXT_LENGTH:
            return f"description over CLIP's {CONTEXT_LENGTH} tokens ({tokens}): {line[:60]!r}..."
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Choosing a diverse subset of many sentences (used by the imports)


def _bag_of_words(sentences: Sequence[str]) -> list[dict[str, float]]:
    docs = [Counter(re.findall(r"[a-z]+", s.lower())) for s in sentences]
    frequency = Counter(word for doc in docs for word in doc)
    vectors = []
    for doc in docs:
        vector = {w: c * math.log((1 + len(docs)) / (1 + frequency[w])) + c * 1e-3 for w, c in doc.items()}
        norm = math.sqrt(sum(v * v for v in vector.values())) or 1.0
        vectors.append({w: v / norm for w, v in vector.items()})
    return vectors


def _cosine(a: dict[str, float], b: dict[str, float]) -> float:
    if len(a) > len(b):
        a, b = b, a
    return sum(v * b.get(w, 0.0) for w, v in a.items())


def diverse_subset(sentences: Sequence[str], count: int) -> list[str]:
    """Up to `count` distinct sentences chosen for diversity, deterministically.

    TF-IDF bag-of-words vectors; start from the most central sentence (highest mean cosine to the others: representative),
    then add the sentence farthest (lowest maximum cosine) from those chosen so far (diverse), ties by original order.
    """
    unique = list(dict.fromkeys(s.strip() for s in sentences if s.strip()))
    if len(unique) <= count:
        return unique
    vectors = _bag_of_words(unique)
    centrality = [sum(_cosine(v, w) for w in vectors) for v in vectors]
    chosen = [max(range(len(unique)), key=lambda i: (centrality[i], -i))]
    closest = [_cosine(vectors[i], vectors[chosen[0]]) for i in range(len(unique))]
    while len(chosen) < count:
        pick = min((i for i in range(len(unique)) if i not in chosen), key=lambda i: (closest[i], i))
        chosen.append(pick)
        closest = [max(closest[i], _cosine(vectors[i], vectors[pick])) for i in range(len(unique))]
    return [unique[i] for i in chosen]


# ----------------------------------------------------------------------------------------------------------------------
# Imports of public formats (PROTOCOL.md)


@dataclass
class ImportReport:
    classes: int = 0
    sentences_read: int = 0
    too_long: int = 0


def _fit(sentences: Sequence[str], count: int, count_tokens: Callable[[str], int], report: ImportReport) -> list[str]:
    fitting = []
    for sentence in sentences:
        report.sentences_read += 1
        if count_tokens(sentence) > CONTEXT_LENGTH:
            report.too_long += 1  # skipped, never truncated
        else:
            fitting.append(sentence)
    return diverse_subset(fitting, count)


def import_area(folder: str | Path, count: int, count_tokens: Callable[[str], int], report: ImportReport) -> dict[str, list[str]]:
    """AREA: `<class>_descriptions.txt` per class, one `<image file>\\t<sentence>` per line (captions of single images)."""
    folder = Path(folder)
    files = sorted(folder.glob("*_descriptions.txt"))
    if not files:
        raise InputError(f"{folder}: no *_descriptions.txt files (AREA format)")
    result = {}
    for file in files:
        name = clean_class_name(file.name[: -len("_descriptions.txt")])
        sentences = []
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t", 1)
            if len(parts) != 2:
                raise InputError(f"{file}: line {number} is not '<image file>\\t<sentence>'")
            sentences.append(parts[1].strip())
        result[name] = _fit(sentences, count, count_tokens, report)
    return result


def _read_json(path: str | Path):
    return read_json(path)


def import_json(path: str | Path, count: int, count_tokens: Callable[[str], int], report: ImportReport) -> dict[str, list[str]]:
    """CuPL / classify-by-description: `{class name: [sentence, ...]}`."""
    data = _read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise InputError(f"{path}: expected a JSON object {{class name: [sentences]}}")
    return {name: _fit([str(s) for s in sentences], count, count_tokens, report) for name, sentences in data.items()}


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def import_engine(path: str | Path, count: int, count_tokens: Callable[[str], int], report: ImportReport) -> dict[str, list[str]]:
    """ENGINE: `{A: {B: [features of A that differ from B]}}`; `d[A][A]` is a general description of A and comes first."""
    data = _read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise InputError(f"{path}: expected a JSON object {{class A: {{class B: [sentences]}}}}")
    result = {}
    for name, by_other in data.items():
        general = _as_list(by_other.get(name))
        contrastive = [s for other, sentences in by_other.items() if other != name for s in _as_list(sentences)]
        lead = _fit(general[:1], 1, count_tokens, report)
        rest = _fit(general[1:] + contrastive, count, count_tokens, report)
        result[name] = (lead + [s for s in rest if s not in lead])[:count]
    return result


IMPORTERS = {"area": import_area, "json": import_json, "engine": import_engine}


def import_descriptions(fmt: str, source: str | Path, count: int, dataset: Optional[str] = None,
                        count_tokens: Optional[Callable[[str], int]] = None) -> tuple[DescriptionSet, ImportReport]:
    if fmt not in IMPORTERS:
        raise InputError(f"--format {fmt}: expected one of {', '.join(IMPORTERS)}")
    if not Path(source).exists():
        raise InputError(f"{source}: no such file or folder")
    report = ImportReport()
    sentences = IMPORTERS[fmt](source, count, count_tokens or default_token_counter(), report)
    report.classes = len(sentences)
    result = DescriptionSet(dataset=dataset, source=fmt, num_descriptions=count,
                            classes={name: {"descriptions": s} for name, s in sentences.items()})
    return result, report


def template_descriptions(names: Sequence[str], templates: Sequence[str], count: Optional[int] = None) -> dict[str, list[str]]:
    """The no-LLM ablation (`--llm none`): each class's descriptions are its prompt templates filled with its name."""
    chosen = list(templates)[: count or len(templates)]
    return {name: [t.format(name) for t in chosen] for name in names}
