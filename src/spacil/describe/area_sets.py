"""`spacil describe --area-sets`: AREA's three description sets, one caption per training image, written as an AREA
descriptions file (`spacil extract --area-descriptions`; the format `spacil descriptions import --format area-sets` writes).

As the official descriptions/generate_descriptions.py `generate_image_description`: one multimodal request per image with
AREA's prompt (below, word for word), the answer's line breaks replaced by spaces, stored as `<image file>\\t<caption>`.
The official script makes the clean set only; the released occluded and augmented sets caption occluded and augmented
copies of the images, with prompts the release does not include. spacil asks the same prompt about an occluded copy (a
rectangle of uniform noise, as `_generate_occluded_inputs` draws it, on the pixels) and an augmented copy (flip and colour
jitter 0.2/0.2/0.2/0.1 on the pixels) of each image, each drawn from (seed, image row). Same dependability as the other
describe commands: the SDK's retries, at most `llm.max_concurrency` requests at a time, an empty answer re-asked up to
`llm.max_attempts` times, the file rewritten atomically after every answer, so a rerun asks only for what it lacks.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm import tqdm

from spacil.config import LLMConfig
from spacil.describe.descriptions import chosen_classes
from spacil.errors import InputError
from spacil.fileio import atomic_write_text, read_json
from spacil.store.area_texts import FILE_FORMAT, MISSING_KEY
from spacil.store.views import AreaAugment, flip_and_jitter, occlude

AREA_PROMPT = """
You are an expert in fine-grained visual classification.
I will show you a low-resolution photo of a "{category}".

Please provide a **single, concise, and detailed sentence** describing the visual appearance of this specific **{category}** (or object) in the image.
Focus on: 
- The specific color and texture.
- The viewpoint or pose.
- Any distinct background environment.
- Distinguishing features visible despite the low resolution.

Constraint: Output ONLY the description sentence. Do not add "Here is the description" or quotes.
"""
SETS = ("clean", "occluded", "augmented")


def area_prompt(name: str) -> str:
    """generate_image_description's prompt for class `name` (underscores read as spaces)."""
    return AREA_PROMPT.format(category=name.replace("_", " "))


def _generator(seed: int, row: int, which: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + row * 7_919 + which * 104_729 + 0xA2EA) % (2 ** 63 - 1))


def altered_image(pixels: torch.Tensor, which: str, generator: torch.Generator) -> torch.Tensor:
    """pixels [3, H, W] in [0, 1] -> the copy the captioner sees: itself (clean), an occluded copy (store.views.occlude,
    AREA's occlusion) or an augmented one (store.views.flip_and_jitter with AREA's 0.2/0.2/0.2/0.1), on the pixels."""
    if which == "clean":
        return pixels
    if which == "occluded":
        return occlude(pixels, generator)
    return flip_and_jitter(pixels, generator, **AreaAugment().params)


def _png(pixels: torch.Tensor) -> bytes:
    from PIL import Image

    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class AreaCaptioner:
    """One multimodal request per image through the OpenAI SDK (AREA's prompt), re-asked while the answer is empty."""

    def __init__(self, llm: LLMConfig, api_key: str):
        from openai import OpenAI

        self.llm = llm
        self.client = OpenAI(api_key=api_key, base_url=llm.base_url, timeout=llm.timeout, max_retries=llm.max_retries)

    def caption(self, name: str, png: bytes) -> Optional[str]:
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        for _ in range(self.llm.max_attempts):
            response = self.client.chat.completions.create(
                model=self.llm.model,
                messages=[{"role": "user", "content": [{"type": "text", "text": area_prompt(name)},
                                                       {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]}])
            answer = response.choices[0].message.content if response.choices else None
            if answer and answer.strip():
                return " ".join(answer.replace("\n", " ").split())
        return None


def _key(name: str) -> str:
    """A class name as the file and the data set are matched (store/area_texts.read_area_sets's rule)."""
    from spacil.data import clean_class_name, normalise_name

    return normalise_name(clean_class_name(name))


def _load(out: Path, dataset: str) -> dict:
    if not out.exists():
        return {"format": FILE_FORMAT, "version": 1, "dataset": dataset, "source": "llm", "sets": {s: {} for s in SETS}}
    data = read_json(out)
    if data.get("format") != FILE_FORMAT or not isinstance(data.get("sets"), dict):
        raise InputError(f"{out}: not an AREA descriptions file; choose another --out")
    for name in SETS:
        data["sets"].setdefault(name, {})
    return data


def describe_area_sets(dataset: str, data_root: str | Path, out: str | Path, llm: LLMConfig,
                       classes: Optional[Sequence[str]] = None, images_per_class: Optional[int] = None, seed: int = 1993,
                       captioner: Optional[Callable[[str, bytes], Optional[str]]] = None, progress: bool = True,
                       class_names: Optional[str] = None) -> dict[str, str]:
    """Caption every training image of `dataset` (the first `images_per_class` of each class when given) in the three
    sets, asking only for what `out` lacks. An existing `out` is added to; one imported with `--allow-missing` gets only
    the classes its "missing_in_release" record names, in the sets that lack them (under the data set's class names).
    -> {"<set>/<class>/<image>": why} for the captions that failed."""
    from spacil.data import open_dataset

    out = Path(out)
    data = _load(out, dataset)
    names, splits = open_dataset(dataset, data_root, class_names=class_names)
    wanted = chosen_classes(names, classes, dataset)
    split = splits["train"]
    # a file imported with --allow-missing: only the (set, class) pairs the release lacks are captioned, now and on
    # every rerun (the release's captions may name other image files than this data root's)
    lacking = data.get(MISSING_KEY)
    lacking = None if lacking is None else {which: {_key(n) for n in lacking.get(which, [])} for which in SETS}
    jobs = []
    for c in wanted:
        rows = [r for r, label in enumerate(split.labels) if label == c][:images_per_class]
        for row in rows:
            image = Path(split.paths[row]).name if split.paths else f"train_{row:05d}.png"
            for which in SETS:
                if lacking is not None and _key(names[c]) not in lacking[which]:
                    continue
                done = data["sets"][which].get(names[c], [])
                if not any(line.split("\t", 1)[0] == image for line in done):
                    jobs.append((which, c, row, image))
    if captioner is None and jobs:
        key = os.environ.get(llm.api_key_env)
        if not key:
            raise InputError(f"environment variable {llm.api_key_env}: not set (the LLM's API key)")
        captioner = AreaCaptioner(llm, key).caption
    failed: dict[str, str] = {}
    lock = threading.Lock()
    bar = tqdm(total=len(jobs), desc=f"AREA captions {dataset}", unit="image", disable=not progress)

    def ask(job):
        from torchvision.transforms.functional import pil_to_tensor

        which, c, row, image = job
        pixels = pil_to_tensor(split.loader(split.items[row])).float() / 255
        altered = altered_image(pixels, which, _generator(seed, row, SETS.index(which)))
        return job, captioner(names[c], _png(altered))

    try:
        with ThreadPoolExecutor(max_workers=llm.max_concurrency) as pool:
            for future in as_completed([pool.submit(ask, job) for job in jobs]):
                (which, c, _, image), caption = future.result()
                with lock:
                    if caption is None:
                        failed[f"{which}/{names[c]}/{image}"] = "empty answer"
                        print(f"spacil: {which} caption of '{names[c]}' {image}: empty answer", file=sys.stderr)
                    else:
                        data["sets"][which].setdefault(names[c], []).append(f"{image}\t{caption}")
                        atomic_write_text(out, json.dumps(data, indent=1, ensure_ascii=False))
                    bar.update(1)
    finally:
        bar.close()
    if not out.exists():
        atomic_write_text(out, json.dumps(data, indent=1, ensure_ascii=False))
    return failed
