"""Representative and diverse samples of a class (SPEC.md section 1), and the grid image the LLM is shown.

`kmeans`: k-means on the class's g(x) with K clusters, the image nearest each centroid (representative, and diverse because the
clusters differ). `fps`: farthest-point sampling from the image nearest the class mean. `random`: K random images.
All from the class's own training images; the generator is the only source of randomness.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    first = torch.randint(len(x), (1,), generator=generator)
    centres = [x[first[0]]]
    for _ in range(1, k):
        dist = torch.cdist(x, torch.stack(centres)).min(dim=1).values ** 2
        if float(dist.sum()) == 0.0:
            pick = torch.randint(len(x), (1,), generator=generator)[0]
        else:
            pick = torch.multinomial(dist / dist.sum(), 1, generator=generator)[0]
        centres.append(x[pick])
    return torch.stack(centres)


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 50) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding. x [n, d] -> centroids [k, d]."""
    centres = _kmeans_plus_plus(x, k, generator)
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(dim=1)
        updated = centres.clone()
        for j in range(k):
            members = x[assign == j]
            if len(members):
                updated[j] = members.mean(dim=0)
        if torch.allclose(updated, centres):
            break
        centres = updated
    return centres


def choose_samples(features: torch.Tensor, count: int, strategy: str, generator: torch.Generator) -> list[int]:
    """features [n, d] = g(x) of one class's training images -> indices of `count` distinct chosen images (all if n <= count)."""
    n = len(features)
    if n <= count:
        return list(range(n))
    x = features.float()
    if strategy == "random":
        return sorted(torch.randperm(n, generator=generator)[:count].tolist())
    if strategy == "fps":
        start = int(torch.cdist(x, x.mean(dim=0, keepdim=True)).squeeze(1).argmin())
        chosen = [start]
        dist = torch.cdist(x, x[start:start + 1]).squeeze(1)
        while len(chosen) < count:
            pick = int(dist.argmax())
            chosen.append(pick)
            dist = torch.minimum(dist, torch.cdist(x, x[pick:pick + 1]).squeeze(1))
        return chosen
    if strategy != "kmeans":
        raise ValueError(f"unknown sample strategy {strategy!r}")
    centres = kmeans(x, count, generator)
    distances = torch.cdist(centres, x)
    chosen: list[int] = []
    for row in distances:  # nearest image per centroid, never the same image twice
        for index in row.argsort().tolist():
            if index not in chosen:
                chosen.append(index)
                break
    return chosen


def compose_grid(images: Sequence, tile: int = 224, columns: int = 3):
    """PIL images -> one PIL grid image (tiles resized to `tile` px, `columns` per row, white background)."""
    from PIL import Image

    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * tile, rows * tile), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB").resize((tile, tile), Image.BICUBIC), ((i % columns) * tile, (i // columns) * tile))
    return grid
