"""A generated ImageFolder data set of coloured shapes: the demo's and the tests' real images, made at run time.

`<root>/shapes/{train,test}/<NN>.<colour>_<shape>/<i>.png`, deterministic for a seed. Small enough to encode in seconds with a
tiny CLIP, real enough to go through PIL, torchvision transforms, the extractor and the store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spacil.fileio import atomic_save_image, make_dirs

SHAPE_CLASSES = (("red", "square"), ("green", "circle"), ("blue", "triangle"), ("yellow", "cross"),
                 ("purple", "square"), ("orange", "circle"))
_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
            "purple": (140, 50, 180), "orange": (240, 140, 30)}


def _draw(shape: str, colour: tuple, rng: np.random.Generator, size: int):
    from PIL import Image, ImageDraw

    background = tuple(int(v) for v in rng.integers(60, 200, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    extent = int(rng.integers(size // 3, size // 2))
    x, y = (int(v) for v in rng.integers(2, size - extent - 2, size=2))
    box = (x, y, x + extent, y + extent)
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y + extent), (x + extent, y + extent), (x + extent // 2, y)], fill=colour)
    else:
        third = extent // 3
        draw.rectangle((x + third, y, x + 2 * third, y + extent), fill=colour)
        draw.rectangle((x, y + third, x + extent, y + 2 * third), fill=colour)
    noise = rng.integers(-12, 13, size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def write_shapes_dataset(root: str | Path, train_per_class: int = 8, test_per_class: int = 4, seed: int = 0,
                         size: int = 64, num_classes: int = 4) -> list[str]:
    """Write the data set under `<root>/shapes` (skipped when complete) and return its class names in index order."""
    root = Path(root) / "shapes"
    rng = np.random.default_rng(seed)
    names = []
    for index, (colour, shape) in enumerate(SHAPE_CLASSES[:num_classes]):
        folder = f"{index:02d}.{colour}_{shape}"
        names.append(f"{colour} {shape}")
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            target = root / split / folder
            make_dirs(target)
            for i in range(count):
                image = _draw(shape, _COLOURS[colour], rng, size)
                path = target / f"{i:03d}.png"
                if not path.exists():
                    atomic_save_image(path, image)
    return names
