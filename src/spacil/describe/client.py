"""`spacil describe`: class descriptions from a multimodal LLM shown representative and diverse samples (SPEC.md 1-2),
and `spacil descriptions import` for the public sets.

Dependability: the official `openai` SDK retries 429, 5xx and timeouts with exponential backoff and honours Retry-After
(`llm.max_retries`); requests run at most `llm.max_concurrency` at a time; every answered class is written to the output
atomically at once, keyed by everything that determines it (model, prompt version, class, sample ids, count, domain), so a
rerun never asks again for what it has, and Ctrl-C loses nothing already answered.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from spacil.config import LLMConfig
from spacil.data import DatasetSpec, dataset_spec, open_dataset
from spacil.data.check import add_names_and_templates
from spacil.describe.descriptions import (DescriptionSet, chosen_classes, default_token_counter, import_descriptions, load_descriptions, parse_answer, template_descriptions, validate_descriptions)
from spacil.errors import InputError
from spacil.fileio import atomic_write_bytes, make_dirs
from spacil.describe.sampling import choose_samples, compose_grid

PROMPT_VERSION = "spa-describe-v1"
SYSTEM_PROMPT = "You write short visual descriptions of categories for an image classifier."


def build_prompt(name: str, domain: str, count: int, shown: int) -> str:
    return (
        f"The image is a grid of {shown} representative and diverse training photos of the class \"{name}\" ({domain}). "
        f"Write exactly {count} short, distinct, visually grounded descriptions of the parts, shapes, colours and textures "
        f"that set \"{name}\" apart from other classes of this kind. Each description under 20 words. "
        f"One description per line, no numbering, no other text."
    )


def cache_key(model: str, name: str, sample_ids: Sequence[str], count: int, domain: str) -> str:
    payload = json.dumps([model, PROMPT_VERSION, name, list(sample_ids), count, domain], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class ClassJob:
    index: int
    name: str
    sample_ids: list[str]
    grid_png: bytes
    grid_path: str
    key: str


class LLMDescriber:
    """One multimodal request per class through the OpenAI SDK, re-asked while the answer fails validation."""

    def __init__(self, llm: LLMConfig, api_key: str, count: int, domain: str, count_tokens: Callable[[str], int]):
        from openai import OpenAI

        self.llm = llm
        self.count = count
        self.domain = domain
        self.count_tokens = count_tokens
        self.client = OpenAI(api_key=api_key, base_url=llm.base_url, timeout=llm.timeout, max_retries=llm.max_retries)

    def describe(self, job: ClassJob, shown: int) -> dict:
        image_url = "data:image/png;base64," + base64.b64encode(job.grid_png).decode()
        prompt = build_prompt(job.name, self.domain, self.count, shown)
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        reason = None
        for attempt in range(1, self.llm.max_attempts + 1):
            text = prompt if reason is None else f"{prompt}\nYour previous answer was rejected ({reason}); answer again in exactly that format."
            response = self.client.chat.completions.create(
                model=self.llm.model,
                messages=[
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": [{"type": "text", "text": text},
                                                 {"type": "image_url", "image_url": {"url": image_url}}]},
                ],
            )
            if response.usage is not None:
                for key in usage:
                    usage[key] += int(getattr(response.usage, key, 0) or 0)
            answer = response.choices[0].message.content if response.choices else None
            lines = parse_answer(answer)
            reason = validate_descriptions(lines, self.count, self.count_tokens)
            if reason is None:
                return {"descriptions": lines, "attempts": attempt, "usage": usage}
        return {"error": reason, "attempts": self.llm.max_attempts, "usage": usage}


def _feature_source(splits, store_path: Optional[str], clip_model: str, pretrained: Optional[str],
                    device: str = "auto") -> Callable[[np.ndarray], torch.Tensor]:
    """-> a function: training rows of one class -> their g(x) [n, d], from a store when given, else from the CLIP."""
    if store_path is not None:
        from spacil.store.format import FeatureStore, rows_as_tensor

        global_ = FeatureStore(store_path).split("train").global_
        return lambda rows: rows_as_tensor(global_, rows)
    from spacil.backbone import FrozenCLIP

    from spacil.devices import resolve_device

    backbone = FrozenCLIP(clip_model, pretrained, resolve_device(device))
    transform = backbone.preprocess.transform()
    split = splits["train"]

    def encode(rows: np.ndarray) -> torch.Tensor:
        features = []
        for start in range(0, len(rows), 64):
            batch = torch.stack([transform(split.loader(split.items[r])) for r in rows[start:start + 64]])
            features.append(backbone.encode_images(batch)[0].cpu())
        return torch.cat(features)

    return encode


def _sample_id(item, data_root: Path) -> str:
    if isinstance(item, (int, np.integer)):
        return f"train/{int(item)}"
    try:
        return str(Path(item).relative_to(data_root))
    except ValueError:
        return str(item)


def describe_dataset(
    dataset: str,
    data_root: str | Path,
    out: str | Path,
    llm: LLMConfig,
    num_descriptions: int = 8,
    visual_samples: int = 6,
    sample_strategy: str = "kmeans",
    classes: Optional[Sequence[str]] = None,
    features: Optional[str] = None,
    clip_model: str = "ViT-B-16",
    pretrained: Optional[str] = "laion400m_e32",
    seed: int = 1993,
    mode: str = "openai",
    progress: bool = True,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] = None,
    device: str = "auto",
    class_names: Optional[str] = None,
    templates: Optional[str] = None,
) -> "DescribeOutcome":
    """Write a descriptions file for `dataset` at `out` (see the module doc). Returns what is in the file at the end and
    what failed in this run. `echo` gets the summary; `warn` (standard error by default) every failure."""
    warn = warn or _warn
    spec: DatasetSpec = dataset_spec(dataset, templates)
    out = Path(out)
    api_key = None
    if mode == "openai":
        api_key = os.environ.get(llm.api_key_env)
        if not api_key:
            raise InputError(f"environment variable {llm.api_key_env} is not set: it must hold the API key "
                             f"(choose another variable with --api-key-env, or --llm none for template descriptions)")
    elif mode != "none":
        raise InputError(f"--llm {mode}: expected openai or none")
    names, splits = open_dataset(dataset, data_root, class_names=class_names, templates=templates)
    wanted = chosen_classes(names, classes, dataset)

    if mode == "none":
        existing = load_descriptions(out) if out.exists() else DescriptionSet()
        if existing.classes and existing.source != "templates":
            raise InputError(f"{out}: holds {len(existing.classes)} classes of '{existing.source}' descriptions; template "
                             f"descriptions would replace them: write to another --out")
        result = DescriptionSet(dataset=dataset, source="templates", num_descriptions=num_descriptions,
                                classes={n: {"descriptions": s} for n, s in
                                         template_descriptions([names[i] for i in wanted], spec.templates, num_descriptions).items()})
        result.save(out)
        echo(f"wrote template descriptions (the no-LLM ablation) for {len(wanted)} classes: {out}")
        return DescribeOutcome(result, {})

    if features is not None:
        from spacil.store.format import FeatureStore

        store = FeatureStore(features)
        if len(store.split("train")) != len(splits["train"].items) or store.classes != names:
            raise InputError(f"--features {features}: not a store of {dataset} under {data_root} (images or classes differ)")

    result = load_descriptions(out) if out.exists() else DescriptionSet()
    if result.dataset not in (None, dataset):
        raise InputError(f"{out}: holds descriptions of '{result.dataset}', not '{dataset}'")
    _refuse_other_settings(out, result, llm.model, num_descriptions)
    result.dataset, result.source, result.model = dataset, "llm", llm.model
    result.prompt_version, result.num_descriptions = PROMPT_VERSION, num_descriptions
    grid_dir = out.with_name(out.stem + "_grids")
    make_dirs(grid_dir)
    count_tokens = default_token_counter()
    describer = LLMDescriber(llm, api_key, num_descriptions, spec.domain, count_tokens)
    url = str(describer.client.base_url).rstrip("/")
    lock = threading.Lock()
    class_features = _feature_source(splits, features, clip_model, pretrained, device)

    labels = splits["train"].labels
    root = Path(data_root)
    bar = tqdm(total=len(wanted), desc=f"describe {dataset}", unit="class", disable=not progress)
    skipped = 0
    failed_now: dict[str, str] = {}  # classes that failed in this run (also those that keep an earlier entry)
    in_flight = [0]  # requests sent and not yet answered (queued classes are not counted)

    def ask(job: ClassJob, shown: int) -> dict:
        with lock:
            in_flight[0] += 1
        try:
            return describer.describe(job, shown)
        finally:
            with lock:
                in_flight[0] -= 1

    def record(job: ClassJob, answer: dict) -> None:
        with lock:
            for key, value in answer.get("usage", {}).items():
                result.usage[key] = result.usage.get(key, 0) + value
            if "error" in answer:
                failed_now[job.name] = answer["error"]
                if job.name not in result.classes:  # an entry made from other samples stays: the header still holds
                    result.failed[job.name] = answer["error"]
            else:
                result.failed.pop(job.name, None)
                result.classes[job.name] = {"descriptions": answer["descriptions"], "sample_ids": job.sample_ids,
                                            "grid": job.grid_path, "cache_key": job.key, "attempts": answer["attempts"],
                                            "usage": answer["usage"]}
            result.save(out)
            bar.update(1)

    def recorded(job: ClassJob, future: Future, probe: bool = False) -> None:
        if future.cancelled():
            return  # never sent (Ctrl-C): not a failure, the next run asks for it
        try:
            answer = future.result()
        except Exception as err:  # noqa: BLE001 - an API failure is reported by class, the others go on
            if probe and _unreachable(err):
                return  # the main thread stops the run with one line naming the URL; nothing is written
            answer = {"error": f"{type(err).__name__}: {err}", "attempts": 0, "usage": {}}
        record(job, answer)

    # Nothing was ever answered into this file: the first class goes alone, so that a server that cannot be reached is
    # one clear error after one class's retries, not one failure per class.
    probe = not result.classes
    executor = ThreadPoolExecutor(max_workers=llm.max_concurrency)
    futures = []
    try:
        for index in wanted:
            name = names[index]
            rows = np.flatnonzero(labels == index)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            chosen = choose_samples(class_features(rows), visual_samples, sample_strategy, generator)
            sample_ids = [_sample_id(splits["train"].items[rows[i]], root) for i in chosen]
            key = cache_key(llm.model, name, sample_ids, num_descriptions, spec.domain)
            if result.classes.get(name, {}).get("cache_key") == key:
                skipped += 1
                bar.update(1)
                continue
            grid = compose_grid([splits["train"].loader(splits["train"].items[rows[i]]) for i in chosen])
            grid_path = grid_dir / f"{index:04d}_{name.replace('/', '_').replace(' ', '_')}.png"
            buffer = io.BytesIO()
            grid.save(buffer, format="PNG")
            atomic_write_bytes(grid_path, buffer.getvalue())  # the bytes sent are the bytes kept
            job = ClassJob(index, name, sample_ids, buffer.getvalue(), str(grid_path), key)
            future = executor.submit(ask, job, len(chosen))
            # the callback records the answer even when Ctrl-C stops the main thread while the request is in flight
            future.add_done_callback(lambda f, job=job, first=probe: recorded(job, f, probe=first))
            futures.append(future)
            if probe:  # wait for the first class alone
                probe = False
                error = future.exception()
                if error is not None and _unreachable(error):
                    bar.close()
                    raise InputError(f"--base-url {url}: cannot connect to the LLM server ({type(error).__name__}: "
                                     f"{error}) after {llm.max_retries} retries; no class was described")
        for future in futures:
            future.exception()  # wait
    except KeyboardInterrupt:
        # classes not yet sent are dropped (not failures); requests already in flight are paid for, so their answers are
        # still saved before the process exits
        executor.shutdown(wait=False, cancel_futures=True)
        bar.close()
        with lock:
            sent = in_flight[0]
        if sent:
            print(f"spacil: saving the answers of {sent} request{'s' if sent != 1 else ''} in flight "
                  f"(Ctrl-C again to abandon {'them' if sent != 1 else 'it'})", file=sys.stderr)
        raise
    executor.shutdown(wait=True)
    bar.close()
    # keep the file's classes in data-set order, whatever order the answers came in
    order = {n: i for i, n in enumerate(names)}
    result.classes = dict(sorted(result.classes.items(), key=lambda item: order.get(item[0], len(order))))
    result.save(out)
    usage = result.usage
    echo(f"described {len(wanted) - skipped - len(failed_now)} classes, {skipped} already in {out}, "
         f"{len(failed_now)} failed; tokens used (all runs): prompt {usage.get('prompt_tokens', 0)}, "
         f"completion {usage.get('completion_tokens', 0)}, total {usage.get('total_tokens', 0)}")
    for name, reason in failed_now.items():
        kept = " (its earlier descriptions, from other samples, are kept)" if name in result.classes else ""
        warn(f"failed: {name}: {reason}{kept}")
    return DescribeOutcome(result, failed_now)


@dataclass
class DescribeOutcome:
    """What `describe_dataset` leaves: the file's content, and the classes that failed in this run (exit status 1)."""

    descriptions: DescriptionSet
    failed: dict[str, str]


def _unreachable(err: Exception) -> bool:
    """A connection that could not be made (not a timeout: a slow server is there)."""
    try:
        from openai import APIConnectionError, APITimeoutError
    except ImportError:  # pragma: no cover - openai is a dependency
        return False
    return isinstance(err, APIConnectionError) and not isinstance(err, APITimeoutError)


def _refuse_other_settings(out: Path, existing: DescriptionSet, model: str, count: int) -> None:
    """A file's header (model, prompt version, count) says how every entry was made: a rerun that would make entries of
    another kind into the same file is refused, so that the header never contradicts an entry."""
    if not existing.classes:
        return
    if existing.source != "llm":
        raise InputError(f"{out}: holds '{existing.source}' descriptions, not an LLM's; write to another --out")
    theirs = {"model": existing.model, "prompt version": existing.prompt_version, "num_descriptions": existing.num_descriptions}
    mine = {"model": model, "prompt version": PROMPT_VERSION, "num_descriptions": count}
    differ = [f"{key} {theirs[key]!r} (this run: {mine[key]!r})" for key in mine if theirs[key] != mine[key]]
    if differ:
        raise InputError(f"{out}: its {len(existing.classes)} classes were described with {', '.join(differ)}; "
                         f"use the same settings to complete it, or another --out")


def _warn(line: str) -> None:
    print(f"spacil: {line}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------------
# command line


# describe's flags and the config keys they set; a flag left out keeps the config's value (or SPEC.md's default)
_DESCRIBE_FLAGS = {
    "model": "llm.model", "base_url": "llm.base_url", "api_key_env": "llm.api_key_env",
    "max_concurrency": "llm.max_concurrency", "timeout": "llm.timeout", "max_retries": "llm.max_retries",
    "max_attempts": "llm.max_attempts", "num_descriptions": "spa.num_descriptions", "visual_samples": "spa.visual_samples",
    "sample_strategy": "spa.sample_strategy", "clip_model": "data.model", "pretrained": "data.pretrained", "seed": "seed",
    "class_names": "data.class_names", "templates": "data.templates",
}


def add_describe_parsers(sub, parser_class) -> None:
    p = sub.add_parser("describe", help="class descriptions from a multimodal LLM (SPEC.md sections 1-2)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", required=True, help="the descriptions file (JSON); grids go to <out>_grids/")
    p.add_argument("--llm", default="openai", choices=["openai", "none"], help="none: template descriptions (no-LLM ablation)")
    p.add_argument("--config", help="a run config whose spa.*, llm.* and data.model/pretrained values are the defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_names_and_templates(p)
    p.add_argument("--model", help="the LLM (default gpt-5)")
    p.add_argument("--base-url", help="an OpenAI-compatible server (default: the SDK's, or OPENAI_BASE_URL)")
    p.add_argument("--api-key-env", help="the environment variable holding the key (default OPENAI_API_KEY)")
    p.add_argument("--classes", nargs="+", help="only these classes")
    p.add_argument("--num-descriptions", type=int, help="descriptions per class (default 8)")
    p.add_argument("--visual-samples", type=int, help="images shown per class (default 6)")
    p.add_argument("--sample-strategy", choices=["kmeans", "fps", "random"])
    p.add_argument("--features", help="a feature store of the same data set: its g(x) pick the samples (no CLIP pass)")
    p.add_argument("--clip-model", help="the CLIP that encodes the samples when no --features (default ViT-B-16)")
    p.add_argument("--pretrained", help="its pretrained tag or checkpoint (default laion400m_e32)")
    p.add_argument("--max-concurrency", type=int)
    p.add_argument("--timeout", type=float, help="seconds per request")
    p.add_argument("--max-retries", type=int, help="per request, on 429, 5xx and timeouts")
    p.add_argument("--max-attempts", type=int, help="per class, while answers fail validation")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", help="where the CLIP encodes the samples: auto (CUDA when available), cpu, cuda[:N]")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--pairwise", action="store_true", help="ENGINE's pairwise descriptions (text only, one request per "
                   "pair of classes) in ENGINE's JSON format, for `spacil extract --pairwise-descriptions`")
    p.add_argument("--area-sets", action="store_true", help="AREA's clean, occluded and augmented description sets (one "
                   "caption per training image, AREA's prompt) as an AREA descriptions file, for `spacil extract "
                   "--area-descriptions`")
    p.add_argument("--images-per-class", type=int, help="--area-sets: caption only the first N training images per class "
                   "(default: all, as the official script)")

    d = sub.add_parser("descriptions", help="work with descriptions files")
    dsub = d.add_subparsers(dest="descriptions_command", required=True, parser_class=parser_class)
    imp = dsub.add_parser("import", help="import a public description set (AREA, CuPL JSON, ENGINE)")
    imp.add_argument("--format", required=True, choices=["area", "area-sets", "json", "engine"])
    imp.add_argument("source", help="AREA: the folder of <class>_descriptions.txt; area-sets: AREA's folder of one data "
                     "set (generated_descriptions, _occ, _aug), for `spacil extract --area-descriptions`; json/engine: the "
                     "JSON file")
    imp.add_argument("--out", required=True)
    imp.add_argument("--num-descriptions", type=int, default=8)
    imp.add_argument("--dataset", default=None)
    imp.add_argument("--allow-missing", action="store_true", help="area-sets: import what the release has and list, in "
                     "one line, the classes a set lacks (`spacil describe --area-sets --out SAME_FILE` captions them)")


def dispatch(args) -> int:
    if args.command == "describe":
        from spacil.config import build_config, load_config

        overrides = list(args.overrides) + [f"{key}={getattr(args, flag)}" for flag, key in _DESCRIBE_FLAGS.items()
                                            if getattr(args, flag) is not None]
        config = load_config(args.config, overrides) if args.config else build_config({}, overrides, source="--set")
        if args.area_sets:
            from spacil.describe.area_sets import describe_area_sets

            if args.images_per_class is not None and args.images_per_class < 1:
                raise InputError(f"--images-per-class {args.images_per_class}: expected at least 1")
            failed = describe_area_sets(args.dataset, args.data_root, args.out, config.llm, args.classes,
                                        args.images_per_class, config.seed, progress=not args.quiet,
                                        class_names=config.data.class_names)
            return 0 if not failed else 1
        if args.pairwise:
            from spacil.describe.pairwise import describe_pairwise

            names, _ = open_dataset(args.dataset, args.data_root)
            chosen = [name for name in names if args.classes is None or name in args.classes]
            failed = describe_pairwise(chosen, args.out, config.llm, dataset_spec(args.dataset).domain,
                                       progress=not args.quiet)
            return 0 if not failed else 1
        knobs = config.spa
        outcome = describe_dataset(args.dataset, args.data_root, args.out, config.llm, knobs.num_descriptions,
                                   knobs.visual_samples, knobs.sample_strategy, args.classes, args.features, config.data.model,
                                   config.data.pretrained or None, config.seed, args.llm, progress=not args.quiet, echo=print,
                                   device=args.device, class_names=config.data.class_names,
                                   templates=config.data.templates)
        return 0 if not outcome.failed else 1
    if args.command == "descriptions" and args.descriptions_command == "import":
        if args.allow_missing and args.format != "area-sets":
            raise InputError("--allow-missing: only for --format area-sets")
        if args.format == "area-sets":  # all three sets, every line: AREA draws from them per batch
            from spacil.fileio import atomic_write_text
            from spacil.store.area_texts import MISSING_KEY, import_area_folders

            imported = import_area_folders(args.source, args.dataset, allow_missing=args.allow_missing)
            atomic_write_text(args.out, json.dumps(imported, indent=1, ensure_ascii=False))
            absent = imported.get(MISSING_KEY) or {}
            if absent:
                print(f"spacil: the release lacks {'; '.join(f'{n}: ' + ', '.join(map(repr, c)) for n, c in absent.items())}"
                      f"; caption them with `spacil describe --area-sets --dataset KEY --data-root DATA --out {args.out}`",
                      file=sys.stderr)
            counts = {name: sum(len(v) for v in by_class.values()) for name, by_class in imported["sets"].items()}
            print(f"imported AREA's description sets of {len(imported['sets']['clean'])} classes "
                  f"({', '.join(f'{n}: {c} sentences' for n, c in counts.items())}) into {args.out}", file=sys.stdout)
            return 0
        if args.num_descriptions < 1:
            raise InputError("--num-descriptions must be at least 1")
        result, report = import_descriptions(args.format, args.source, args.num_descriptions, args.dataset)
        result.save(args.out)
        print(f"imported {report.classes} classes ({report.sentences_read} sentences read, {report.too_long} over CLIP's "
              f"77 tokens skipped) into {args.out}", file=sys.stdout)
        return 0
    raise InputError(f"unknown command {args.command}")
