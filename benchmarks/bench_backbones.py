"""What reading g, P and z costs per image-tower family: spacil's encode step against a bare forward of the same tower.

For each family, a full-size open_clip architecture with random weights (open_clip's and timm's own initialisation; nothing
downloads): the bare forward is `model.encode_image(x)` (the tower's own forward, g only); spacil's is
`FrozenCLIP.encode_image_features`' work, the family's adapter (spacil.backbone.towers) plus the normalisation: one trunk
pass, then the head on the pooled feature *and* on every patch (for a MAP pool, the pool's value path and MLP on each patch;
for a ConvNeXt, the head's norm and projection on each position). The text towers are not built (the SigLIP tokenizer is a
Hugging Face download). Both run in fp32 on the same batch, interleaved, `--repeats` times; the medians are reported and
their ratio (spacil / bare) is the cost of the patches. Extraction's other work (decoding, writing) is the same per image for
every family (docs/benchmarks/extract_throughput.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import torch

from _common import add_device_argument, device_description, synchronize, write_result
from spacil.backbone.towers import image_tower
from spacil.devices import resolve_device

# (family, open_clip architecture, what it stands for)
MODELS = [
    ("open_clip-vit", "ViT-B-16", "OpenAI / LAION / DataComp / DFN / MetaCLIP ViT-B/16"),
    ("timm-vit", "EVA02-B-16", "EVA02-CLIP B/16"),
    ("timm-vit-map", "ViT-B-16-SigLIP", "SigLIP B/16 (SigLIP2 B/16: the same tower)"),
    ("timm-vit-map", "PE-Core-B-16", "PE-Core B/16"),
    ("timm-convnext", "convnext_base_w", "ConvNeXt-Base-W CLIP (256 px)"),
]


def _time(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per path and model, interleaved")
    parser.add_argument("--models", nargs="*", default=None, help="architectures to run (default: all five)")
    add_device_argument(parser)
    args = parser.parse_args()
    import open_clip

    device = resolve_device(args.device)
    load = os.getloadavg()[0]
    rows, results = [], []
    logging.disable(logging.WARNING)  # "no pretrained weights": random on purpose
    for family, name, stands_for in MODELS:
        if args.models and name not in args.models:
            continue
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None, device=device).eval()
        tower = image_tower(model.visual, name)
        size = int(model.visual.preprocess_cfg["size"][0] if isinstance(model.visual.preprocess_cfg["size"], (tuple, list))
                   else model.visual.preprocess_cfg["size"])
        images = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)

        def bare():
            with torch.no_grad():
                model.encode_image(images, normalize=True)

        def spacil():
            with torch.no_grad():
                g, patches, _ = tower.features(images, device, "fp32")
                torch.nn.functional.normalize(g, dim=-1), torch.nn.functional.normalize(patches, dim=-1)

        bare(), spacil()  # warm-up
        times = {"bare": [], "spacil": []}
        for _ in range(args.repeats):
            times["bare"].append(_time(bare, device))
            times["spacil"].append(_time(spacil, device))
        bare_s, spacil_s = statistics.median(times["bare"]), statistics.median(times["spacil"])
        result = {"family": family, "model": name, "stands_for": stands_for, "image_size": size,
                  "patches": tower.num_patches, "grid": list(tower.grid), "z": tower.width is not None,
                  "bare_images_per_s": args.batch_size / bare_s, "spacil_images_per_s": args.batch_size / spacil_s,
                  "ratio_spacil_over_bare": spacil_s / bare_s, "seconds": times}
        results.append(result)
        rows.append((f"{family}: {name}", f"{result['spacil_images_per_s']:.2f} img/s with P and z "
                                          f"vs {result['bare_images_per_s']:.2f} bare ({result['ratio_spacil_over_bare']:.2f}x "
                                          f"the time; {tower.num_patches} patches, {size} px)"))
        del model, tower
    end_load = os.getloadavg()[0]
    rows.append(("device, batch, repeats", f"{device_description(device)}, {args.batch_size} images, median of "
                                           f"{args.repeats} interleaved"))
    rows.append(("load average (1 min) at start / end", f"{load:.1f} / {end_load:.1f}"))
    notes = ("Random weights, fp32, one batch of random pixels per model. The ratio is spacil's encode step over the "
             "tower's own forward on the same batch, measured side by side; a machine under load (see the load average) "
             "moves both alike but adds noise to the ratio.")
    write_result("backbones", "Extraction throughput per image-tower family: spacil's encode step vs a bare forward",
                 rows, {"device": str(device), "batch_size": args.batch_size, "repeats": args.repeats,
                        "load_average": [load, end_load], "results": results}, notes)


if __name__ == "__main__":
    main()
