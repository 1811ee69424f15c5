"""`spacil demo`: the embedded default. Offline, no download, a few minutes on 2 CPU cores.

1. Writes the demo world (`spacil.demo.world`) as a feature store and runs zero-shot, SimpleCIL, fine-tune, RAPF, RanPAC,
   BOFA (both on the world's pre-projection z), ENGINE, SPA, SPA's six ablations and PROOF (which keeps 20 exemplar feature rows
   per class: the one method here that stores old data) on it, through the same runner as any benchmark; prints one
   table and writes the report with its pictures.
2. Draws which patches SPA picks for a few test images (for the true class and for a sibling class).
3. Proves the image-level plumbing: a tiny random-weight open_clip model encodes a few generated images (extract -> store ->
   run). Its accuracy is not the point: the weights are random.
Everything is resumable: run it again and finished runs are reused.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from spacil.config import build_config, differing_keys
from spacil.demo.world import WorldSpec, make_world
from spacil.store.format import FeatureStore
from spacil.fileio import atomic_save_figure, atomic_save_npz, atomic_write_text, make_dirs
from spacil.report import write_report
from spacil.runner import Run

# The demo world has 7x7 = 49 patches, a quarter of ViT-B/16's 196; k is scaled with it (16 * 49 / 196 = 4, doubled to
# leave room for the three part patches among distractors).
DEMO_OVERRIDES = {"spa": {"top_k_patches": 8}, "train": {"epochs": 5}}
# RAPF's official schedule is 15 epochs of CIFAR-100's 50 batches (750 adapter steps per task, the learning rate divided by 10
# after steps 200 and 500); a demo task has 4 batches, so RAPF runs 188 epochs with the milestones at the same steps.
RAPF_DEMO_SCHEDULE = {"rapf": {"adapter_epochs": 188, "milestones": [50, 125]}}
# RanPAC's official M = 10,000 lifts ViT-B/16's z (768 wide) 13-fold; the demo's z is 96 wide, so M = 1,250 (the same
# ratio; G is 12 MB instead of 800 MB).
RANPAC_DEMO = {"ranpac": {"M": 1250}}

# AREA: the official non-CIFAR values (exps/area/*.json: K 8, init_lr 0.01, batch 64, weight decay 0.05) with the demo's
# epochs; the world has 8 sentences per class in each description set, so K = 8 fills every textual basis.
AREA_DEMO = {"area": {"basis_rank": 8, "area_lr": 0.01, "area_batch_size": 64, "area_weight_decay": 0.05}}

# The demo's table (Markdown), written next to report.md; the README's demo table is this file of a full demo.
TABLE_FILE = "demo_table.md"

# The generated test image `spacil demo` explains (docs/explain.md shows its figure).
EXPLAIN_ROW = "test:5"

RUNS = (
    ("zeroshot", "zeroshot", {}),
    ("simplecil", "simplecil", {}),
    ("finetune", "finetune", {}),
    ("rapf", "rapf", RAPF_DEMO_SCHEDULE),
    ("proof_20_exemplars_per_class", "proof", {"proof": {"fixed_memory": True, "memory_per_class": 20}}),
    ("ranpac", "ranpac", RANPAC_DEMO),
    ("bofa", "bofa", {}),
    ("engine", "engine", {}),
    ("area", "area", AREA_DEMO),
    ("spa", "spa", {}),
    ("spa_global_only", "spa", {"ablation": {"patch_branch": False}}),
    ("spa_no_ot", "spa", {"ablation": {"optimal_transport": False}}),
    ("spa_random_patches", "spa", {"ablation": {"semantic_selection": False}}),
    ("spa_no_projectors", "spa", {"ablation": {"projectors": False}}),
    ("spa_no_calibration", "spa", {"ablation": {"gaussian_calibration": False}}),
    ("spa_template_tokens", "spa", {"ablation": {"llm_descriptions": False}}),
)


def _merge(base: dict, extra: dict) -> dict:
    merged = json.loads(json.dumps(base))
    for key, value in extra.items():
        if isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def _run_one(name: str, method: str, extra: dict, store: Path, runs: Path, epochs: int, device: str = "auto") -> Path:
    tree = _merge(_merge(DEMO_OVERRIDES, {"train": {"epochs": epochs}, "method": method, "device": device,
                                          "data": {"features": str(store)}}), extra)
    if method == "proof":  # PROOF trains with its own section (official hyper-parameter names); same epochs as the others
        tree = _merge(tree, {"proof": {"tuned_epoch": epochs}})
    if method == "engine":  # so does ENGINE
        tree = _merge(tree, {"engine": {"engine_epochs": epochs}})
    if method == "area":  # and AREA
        tree = _merge(tree, {"area": {"area_epochs": epochs}})
    config = build_config(tree, source="demo")
    folder = runs / name
    if (folder / "summary.json").exists():
        summary = json.loads((folder / "summary.json").read_text())
        saved = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").exists() else None
        same = isinstance(saved, dict) and not differing_keys(saved, config, folder=folder)  # another device: reused
        if summary.get("complete") and same:
            return folder  # finished earlier with the same settings
        if not same:
            shutil.rmtree(folder)
    resume = (folder / "checkpoints" / "last.pt").exists()
    Run(config, FeatureStore(store), folder, resume=resume).run()
    return folder


def plot_patch_selection(store: Path, world: dict, top_k: int, path: Path, images: int = 3) -> None:
    """For a few test images: relevance of each patch to the true class and to a sibling, the k picked patches outlined,
    the patches that really show the class's parts marked with a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spacil.plotstyle import fonts_for

    with fonts_for(list(world["names"])) as shown:  # class names in any script
        fig = _patch_selection_figure(store, {**world, "names": [shown(n) for n in world["names"]]}, top_k, images)
    try:
        atomic_save_figure(path, fig)
    finally:
        plt.close(fig)


def _patch_selection_figure(store: Path, world: dict, top_k: int, images: int):
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from spacil.ops.patch_selection import patch_relevance, select_top_k

    features = FeatureStore(store)
    test = features.split("test")
    grid = world["grid"]
    family_size = WorldSpec().family_size
    rows = np.linspace(0, len(test) - 1, images).astype(int)
    fig, axes = plt.subplots(images, 2, figsize=(6.4, 3.0 * images), dpi=110)
    for r, row in enumerate(rows):
        label = int(test.labels[row])
        sibling = label - 1 if label % family_size else label + 1
        patches = torch.from_numpy(np.asarray(test.patches[row:row + 1], dtype=np.float32))
        for col, cls in enumerate((label, sibling)):
            tokens = torch.from_numpy(np.array(features.descriptions[cls:cls + 1]))
            mask = torch.from_numpy(np.array(features.description_mask[cls:cls + 1]))
            relevance = patch_relevance(patches, tokens, mask)[0, 0]
            picked, _ = select_top_k(relevance.view(1, 1, -1), top_k)
            ax = axes[r, col]
            ax.imshow(relevance.view(grid, grid).cpu().numpy(), cmap="magma", vmin=-0.3, vmax=1.0)
            for index in picked.view(-1).tolist():
                ax.add_patch(Rectangle((index % grid - 0.5, index // grid - 0.5), 1, 1, fill=False, edgecolor="cyan", lw=1.6))
            for index in world["test_part_locations"][row]:
                ax.plot(index % grid, index // grid, "o", color="lime", markersize=5)
            kind = "true class" if cls == label else "sibling (wrong) class"
            ax.set_title(f"image {row}: {kind}\n{world['names'][cls]}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("patch relevance to a class's descriptions; cyan: the k picked patches, green: patches showing the class's parts",
                 fontsize=8)
    fig.tight_layout()
    return fig


def image_level_path(out: Path, echo, device: str = "auto") -> dict:
    """Generated images -> tiny random-weight open_clip -> feature store -> SimpleCIL and SPA runs -> `spacil explain` of
    one test image."""
    from spacil.backbone import write_tiny_model
    from spacil.describe.descriptions import DescriptionSet, template_descriptions
    from spacil.explain import explain_images
    from spacil.data import DATASETS
    from spacil.store.extract import extract_store
    from spacil.demo.shapes import write_shapes_dataset

    data_root = out / "data"
    names = write_shapes_dataset(data_root, train_per_class=8, test_per_class=4, seed=3)
    model = write_tiny_model(out / "tiny_clip", seed=0)
    store = out / "store"
    if not (store / "meta.json").exists():
        descriptions = template_descriptions(names, DATASETS["shapes"].templates)
        descriptions_file = (out / "descriptions.json").resolve()  # the file the store names, where explain reads sentences
        DescriptionSet(dataset="shapes", source="templates", classes={n: {"descriptions": s} for n, s in descriptions.items()}
                       ).save(descriptions_file)
        from spacil.devices import device_name, resolve_device

        extract_store("shapes", data_root, store, model=model, pretrained=None, batch_size=16, descriptions=descriptions,
                      descriptions_source=str(descriptions_file), progress=False, device=device_name(resolve_device(device)))
    results = {}
    for method in ("simplecil", "spa"):
        folder = _run_one(f"image_{method}", method, {"data": {"init_cls": 2, "increment": 2}, "spa": {"top_k_patches": 4}},
                          store, out / "runs", epochs=2, device=device)
        results[method] = json.loads((folder / "summary.json").read_text())
    echo(f"image-level path (tiny random-weight CLIP, {len(names)} generated classes): extract -> store -> run works; "
         f"SimpleCIL {results['simplecil']['avg_acc']:.1f}, SPA {results['spa']['avg_acc']:.1f} average accuracy "
         f"(random weights: the numbers mean nothing, the plumbing is the point)")
    explain_images(out / "runs" / "image_spa", rows=[EXPLAIN_ROW], out=out / "explain", device=device, echo=lambda line: None)
    echo(f"spacil explain of one generated test image: {out / 'explain' / EXPLAIN_ROW.replace(':', '_')}.png")
    return results


def run_demo(out: str | Path = "demo_out", quick: bool = False, echo=print, device: str = "auto") -> dict:
    """`device`: where the runs compute (auto: CUDA when available); finished runs are reused on any device."""
    from spacil.devices import resolve_device

    echo(f"device: {resolve_device(device)}")
    out = Path(out)
    make_dirs(out)
    spec = WorldSpec() if not quick else replace(WorldSpec(), num_classes=30, train_per_class=16, test_per_class=8)
    epochs = DEMO_OVERRIDES["train"]["epochs"] if not quick else 1
    store = out / "world"
    world_info_path = out / "world_info.npz"
    if not (store / "meta.json").exists() or not world_info_path.exists():
        shutil.rmtree(store, ignore_errors=True)
        world = make_world(store, spec)
        atomic_save_npz(world_info_path, test_part_locations=world["test_part_locations"], grid=world["grid"], names=np.array(world["names"]))
    stored = np.load(world_info_path)
    world = {"test_part_locations": stored["test_part_locations"], "grid": int(stored["grid"]), "names": list(stored["names"])}
    echo(f"demo world: {spec.num_classes} classes in families of {spec.family_size}, {spec.grid}x{spec.grid} patches, "
         f"d={spec.dim} -> {store}")
    folders = []
    for name, method, extra in tqdm(RUNS, desc="demo runs", unit="run"):
        folders.append(_run_one(name, method, extra, store, out / "runs", epochs, device))
    table = write_report(folders, out)
    atomic_write_text(out / TABLE_FILE, table + "\n")  # what the README's demo table is made from (benchmarks/sync_docs.py)
    plot_patch_selection(store, world, DEMO_OVERRIDES["spa"]["top_k_patches"], out / "patch_selection.png")
    echo("")
    echo(table)
    echo("")
    image_level_path(out / "image_path", echo, device)
    echo(f"\nwrote {out / 'report.md'}, {out / TABLE_FILE}, {out / 'curves.png'}, {out / 'matrix_spa.png'} (one matrix per run), {out / 'patch_selection.png'}")
    echo("a real benchmark: spacil run --config cifar224_b0 --set data.data_root=DATA --set data.features=STORE "
         "--set data.pretrained=CHECKPOINT.pt --set data.descriptions=DESCRIPTIONS.json --out runs/cifar224_spa")
    summaries = {name: json.loads((out / "runs" / name / "summary.json").read_text()) for name, _, _ in RUNS}
    return summaries
