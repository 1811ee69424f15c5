"""Extraction throughput against a bare open_clip forward pass of the same model and batch size, in one run.

ViT-B-16 with random weights (the same cost as the real one). `spacil extract` decodes generated 224 px PNG images, encodes
them and writes fp16 memory maps; the bare pass runs `model.encode_image` on tensors already on the device, under the same
autocast precision. Rounds alternate.
Target: extraction at least 0.9x the bare forward's images per second.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import add_device_argument, write_result
from spacil.backbone import FrozenCLIP
from spacil.devices import autocast, resolve_device, resolve_precision
from spacil.store.extract import extract_store
from spacil.demo.shapes import write_shapes_dataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images-per-class", type=int, default=40, help="training images per class (4 classes)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: extract's own default)")
    add_device_argument(parser)
    parser.add_argument("--precision", default=None, help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on the CPU)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spacil_bench_extract_"))
    try:
        write_shapes_dataset(work / "data", train_per_class=args.images_per_class, test_per_class=0, seed=0, size=224)
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
        clip = FrozenCLIP("ViT-B-16", None, device)
        images = 4 * args.images_per_class
        batch = torch.randn(args.batch_size, 3, 224, 224, device=device)
        bare, extract = [], []
        for round_ in range(args.rounds):
            start = time.perf_counter()
            with torch.no_grad(), autocast(device, precision):
                for _ in range(0, images, args.batch_size):
                    clip.model.encode_image(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            bare.append(images / (time.perf_counter() - start))
            out = work / f"store{round_}"
            start = time.perf_counter()
            extract_store("shapes", work / "data", out, model="ViT-B-16", pretrained=None, batch_size=args.batch_size,
                          workers=args.workers, progress=False, backbone=clip, precision=precision)
            extract.append(images / (time.perf_counter() - start))
        ratio = statistics.median(extract) / statistics.median(bare)
        workers = "default" if args.workers is None else args.workers
        rows = [("images", f"{images} PNG, 224 px, batch {args.batch_size}, {workers} loader workers, fp16 store, "
                           f"{device.type}, {precision}"),
                ("bare `encode_image`, images/s (median)", f"{statistics.median(bare):.2f}"),
                ("`spacil extract` (decode, encode, patches, write), images/s (median)", f"{statistics.median(extract):.2f}"),
                ("ratio extract / bare", f"{ratio:.3f} (target >= 0.9: {'met' if ratio >= 0.9 else 'missed'})"),
                ("CIFAR-100 (60,000 images) at this rate", f"{60000 / statistics.median(extract) / 3600:.1f} h")]
        write_result("extract_throughput", "Extraction throughput vs a bare open_clip forward (ViT-B-16)", rows,
                     {"bare_images_per_second": bare, "extract_images_per_second": extract, "ratio": ratio, "images": images,
                      "device": device.type, "precision": precision},
                     notes="The model is built once and shared; the extraction time includes listing the folders, "
                           "decoding and resizing the images, both outputs of the forward pass, the fp16 writes with their "
                           "progress records, and encoding the text prompts of the four classes.")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
