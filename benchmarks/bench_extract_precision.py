"""How far reduced-precision extraction moves the features: bf16 and fp16 autocast against fp32, in one run.

ViT-B-16 with random weights (open_clip's own initialisation; no download), a few generated 224 px images through
spacil's transform and `FrozenCLIP.encode_images`, the path `spacil extract` takes. Reported: cosine between the reduced
precision's and fp32's global embeddings g(x) and patch tokens P(x), min and mean; for scale, the same between fp32
features and their float16 storage (what a default store holds).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from _common import add_device_argument, write_result
from spacil.backbone import FrozenCLIP
from spacil.data import image_transform, open_dataset
from spacil.devices import resolve_device
from spacil.demo.shapes import write_shapes_dataset


def _cosines(a: torch.Tensor, b: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).flatten()
    return {"min": float(cos.min()), "mean": float(cos.mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images-per-class", type=int, default=2, help="images per class (4 classes)")
    add_device_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    args = parser.parse_args()
    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="spacil_bench_precision_"))
    try:
        write_shapes_dataset(work / "data", train_per_class=args.images_per_class, test_per_class=0, seed=0, size=224)
        torch.manual_seed(args.seed)
        clip = FrozenCLIP("ViT-B-16", None, device)
        _, splits = open_dataset("shapes", work / "data")
        transform = image_transform(clip.image_size)
        images = torch.stack([transform(splits["train"].loader(item)) for item in splits["train"].items])
        features, seconds = {}, {}
        for precision in ("fp32", "bf16", "fp16"):
            start = time.perf_counter()
            global_, patches = clip.with_precision(precision).encode_images(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[precision] = time.perf_counter() - start
            features[precision] = (global_.cpu(), patches.cpu())
        exact_global, exact_patches = features["fp32"]
        results = {"stored float16": {"global": _cosines(exact_global, exact_global.half()),
                                      "patches": _cosines(exact_patches, exact_patches.half())}}
        for precision in ("bf16", "fp16"):
            global_, patches = features[precision]
            results[precision] = {"global": _cosines(global_, exact_global), "patches": _cosines(patches, exact_patches)}
        rows = [("images", f"{len(images)} generated PNG, 224 px, ViT-B-16 random weights (seed {args.seed}), {device.type}")]
        for name, result in results.items():
            label = "fp32 features vs their float16 storage" if name == "stored float16" else f"{name} autocast vs fp32"
            rows.append((f"{label}: cosine of g(x), min / mean",
                         f"{result['global']['min']:.6f} / {result['global']['mean']:.6f}"))
            rows.append((f"{label}: cosine of patch tokens, min / mean",
                         f"{result['patches']['min']:.6f} / {result['patches']['mean']:.6f}"))
        rows.append(("seconds per pass (fp32 / bf16 / fp16; first pass includes warm-up)",
                     " / ".join(f"{seconds[p]:.2f}" for p in ("fp32", "bf16", "fp16"))))
        write_result("extract_precision", "Reduced-precision extraction vs fp32 (ViT-B-16, random weights)", rows,
                     {"device": device.type, "images": len(images), "cosine": results, "seconds": seconds},
                     notes="The transformer runs under autocast; ln_post, the projection and the normalisation in fp32 "
                           "(FrozenCLIP.encode_images). Random weights, not a trained CLIP: trained weights have other "
                           "activation statistics, so read these as the size of the effect, not its exact value. "
                           "Timings on a shared CPU machine mean nothing for a GPU.")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
