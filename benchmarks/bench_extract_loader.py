"""The loader workers' work per image: 0.1's full transform (decode, resize, crop, ToTensor, Normalize) against what
`spacil extract` now does in a worker (decode, resize, crop, uint8 tensor; ToTensor and Normalize run batched on the
encoding device), in one process, rounds alternating. Generated PNGs at 224 px (an ImageNet-like crop) and 32 px
(CIFAR-like, upscaled to 224)."""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import write_result
from spacil.data import image_transform, open_dataset
from spacil.store.extract import _ImageRows, _Normalise
from spacil.demo.shapes import write_shapes_dataset


def _per_image_ms(dataset, count: int) -> float:
    start = time.perf_counter()
    for index in range(count):
        dataset[index]
    return 1000 * (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images-per-class", type=int, default=16, help="images per class (4 classes)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a loader worker
    work = Path(tempfile.mkdtemp(prefix="spacil_bench_loader_"))
    try:
        rows, data = [], {}
        for size in (224, 32):
            root = work / str(size)
            write_shapes_dataset(root, train_per_class=args.images_per_class, test_per_class=0, seed=0, size=size)
            split = open_dataset("shapes", root)[1]["train"]
            transform = image_transform(224)
            old = [transform(split.loader(item)) for item in split.items[:2]]
            new_rows = _ImageRows(split, transform)
            assert torch.equal(torch.stack(old), _Normalise(torch.device("cpu"))(torch.stack([new_rows[i][0] for i in range(2)])))
            count = len(split.items)
            before, after = [], []
            for _ in range(args.rounds):
                start = time.perf_counter()
                for item in split.items:
                    transform(split.loader(item))
                before.append(1000 * (time.perf_counter() - start) / count)
                after.append(_per_image_ms(new_rows, count))
            data[f"{size}px"] = {"full_transform_ms": before, "uint8_worker_ms": after}
            ratio = statistics.median(after) / statistics.median(before)
            rows.append((f"{size} px PNG -> 224: worker ms per image, 0.1 transform / now (median of {args.rounds})",
                         f"{statistics.median(before):.2f} / {statistics.median(after):.2f} ({ratio:.2f}x the time)"))
        write_result("extract_loader", "Loader work per image: full transform vs uint8 (normalised on the device)", rows, data,
                     notes="One process, one thread, as a loader worker; the machine is shared, so compare the two columns "
                           "of a row, measured side by side. The device-side ToTensor and Normalize give the same float32 "
                           "values (checked by the script and by tests/test_extract.py).")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
