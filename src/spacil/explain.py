"""`spacil explain RUN_DIR IMAGE...`: what a run's learner saw in a photo (docs/explain.md).

For SPA: the photo with its patch grid, the frozen relevance of every patch to the predicted class as a heat overlay, the k
patches picked for that class (and for `--class`) outlined; beside it the class's description sentences, each linked to the
patches the transport plan sends most mass to (line width = plan mass); and the top classes' logits split into global and
patch score. `<image>.json` holds every number drawn.

Exact by construction: the numbers come from `SPA.explain`, the same computation `SPA.logits` predicts with, on features
encoded as extraction encodes a store's rows (`encode_pil_images`: the store's transform, precision and dtype). What an
ablation really uses is what is drawn: random patches, the uniform plan (no OT), no patch panel (global only). Other methods
have no patch-level evidence: their class scores only.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from spacil.config import Config, build_config, read_yaml_mapping
from spacil.data import class_order, normalise_name
from spacil.devices import resolve_device
from spacil.errors import InputError
from spacil.fileio import atomic_save_figure, atomic_write_text, make_dirs
from spacil.learner import FeatureBatch, Learner, LearnerContext
from spacil.methods import create_learner
from spacil.methods.spa import SPA
from spacil.recorded_paths import resolve_data_paths, resolve_recorded
from spacil.runner import load_checkpoint
from spacil.store.format import FeatureStore

# Figure layout: panel widths in inches at DPI dots per inch (whole pixels), all panels HEIGHT inches tall.
DPI = 100
HEIGHT = 4.5
PANEL_WIDTHS = {"photo": 4.0, "sentences": 5.0, "scores": 3.5}
LINKS_PER_SENTENCE = 3  # patches each sentence is linked to: those its plan column sends most mass to
DISPLAY_PIXELS = 448  # the photo is drawn downscaled to this long side
IMAGES_PER_BATCH = 16  # images encoded and scored together


@dataclass
class LoadedRun:
    """A finished run's learner and what explaining needs around it."""

    config: Config
    store: FeatureStore
    learner: Learner
    class_index: list[int]  # data-set class index of each logit column (seen_positions through the class order)
    device: torch.device

    @property
    def names(self) -> list[str]:
        return [self.store.classes[c] for c in self.class_index]


def load_run(run_dir: str | Path, store: Optional[str | Path] = None, device: str = "auto") -> LoadedRun:
    """The learner of a run folder after its last finished task (checkpoints/last.pt), on `device`, with its store
    (`store`, else the one its config.yaml names)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise InputError(f"{config_path}: missing; not a run folder")
    resolved = resolve_device(device)
    # its paths are recorded relative to the run folder (older runs: to where `spacil run` ran): recorded_paths
    config = build_config(resolve_data_paths(read_yaml_mapping(config_path, "run's config"), run_dir), source=str(config_path))
    config = config.model_copy(update={"device": str(resolved)})
    store_path = store or config.data.features
    if store_path is None:
        raise InputError(f"{config_path}: names no feature store (data.features); pass --store STORE")
    features = FeatureStore(store_path)
    checkpoint = run_dir / "checkpoints" / "last.pt"
    if not checkpoint.is_file():
        raise InputError(f"{checkpoint}: missing; the run finished no task")
    context = LearnerContext(features.dim, features.num_patches, features.logit_scale, resolved,
                             logit_bias=features.logit_bias)
    learner = create_learner(config, context)
    load_checkpoint(checkpoint, learner, config.method)
    order = class_order(features.num_classes, config.seed, config.data.shuffle)
    class_index = [order[p] for p in learner.seen_positions]
    names = [features.classes[c] for c in class_index]
    if names != list(learner.seen_names):
        raise InputError(f"{features.path}: not the store of run {run_dir} (its classes in the run's order differ from the "
                         f"checkpoint's: '{names[0]}' vs '{learner.seen_names[0]}'); pass its store with --store")
    return LoadedRun(config, features, learner, class_index, resolved)


def load_backbone(store: FeatureStore, device: torch.device, pretrained: Optional[str] = None):
    """The frozen CLIP the store's meta.json names, in its precision (`pretrained`: its checkpoint file, when it is no
    longer where meta.json says). InputError naming the missing file when the weights cannot be had, or the checkpoint
    when it is not the one the store was encoded with."""
    import open_clip

    from spacil.backbone import FrozenCLIP, local_dir_checkpoint

    meta_path = store.path / "meta.json"
    backbone = store.backbone
    model = backbone.get("model")
    if not model:
        raise InputError(f"{meta_path}: 'backbone.model' missing; the store does not say which CLIP encoded it")
    if model.startswith("local-dir:"):
        if pretrained is not None:
            raise InputError(f"--pretrained {pretrained}: the store's backbone is {model}, which loads the weights in its own folder")
        folder = Path(model[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise InputError(f"{folder / 'open_clip_config.json'}: missing (the backbone {meta_path} names)")
        if backbone.get("checkpoint_sha256") and local_dir_checkpoint(model) is None:
            raise InputError(f"{folder / 'open_clip_pytorch_model.bin'}: missing (the weights of the backbone {meta_path} names)")
    pretrained = pretrained or backbone.get("pretrained") or None
    is_file = pretrained is not None and (Path(pretrained).suffix != "" or "/" in pretrained)
    if is_file and not Path(pretrained).is_file():
        raise InputError(f"{pretrained}: missing (the checkpoint of the backbone {meta_path} names); pass it with --pretrained FILE")
    try:
        clip = FrozenCLIP(model, pretrained, str(device), store.meta.get("precision", "fp32"))
    except InputError as err:
        if "could not be downloaded" not in str(err):  # a tag open_clip would have to download: say which weights
            raise
        source = open_clip.get_pretrained_cfg(model, pretrained) or {}
        raise InputError(f"{meta_path}: the weights of {model} '{pretrained}' are missing (not in open_clip's cache, no network "
                         f"to fetch {source.get('hf_hub') or source.get('url') or 'them'}); pass the checkpoint with "
                         f"--pretrained FILE") from None
    recorded = backbone.get("checkpoint_sha256")
    if recorded and clip.info.checkpoint_sha256 and clip.info.checkpoint_sha256 != recorded:
        raise InputError(f"{pretrained or model}: not the checkpoint {meta_path} was encoded with (sha256 differs)")
    if clip.num_patches != store.num_patches or clip.dim != store.dim:
        raise InputError(f"{meta_path}: the backbone gives {clip.num_patches} patches of dimension {clip.dim}, the store "
                         f"holds {store.num_patches} of {store.dim}")
    return clip


# ----------------------------------------------------------------------------------------------------------------------
# Which sentence each semantic token is


def _descriptions_file(store: FeatureStore, override: Optional[str | Path]) -> Path:
    meta_path = store.path / "meta.json"
    if override is not None:
        path = Path(override)
    else:
        text = store.meta.get("text") if isinstance(store.meta.get("text"), dict) else {}
        source = text.get("descriptions_source")
        if not source:
            raise InputError(f"{meta_path}: names no descriptions file (text.descriptions_source); pass --descriptions FILE")
        path = resolve_recorded(source, store.path)  # relative to the store (older stores: to where extract ran)
    if not path.is_file():
        raise InputError(f"{path}: the descriptions file {meta_path} names is gone; pass --descriptions FILE")
    return path


def token_sentences(run: LoadedRun, backbone, descriptions: Optional[str | Path] = None) -> list[tuple[list[str], list[int]]]:
    """Per logit column: (the sentences behind the class's semantic tokens, the sentence of each real token). InputError
    when the descriptions file is gone or no longer matches the store's embeddings."""
    store, config = run.store, run.config
    if not config.ablation.llm_descriptions:  # the template-token ablation: the class's prompts, one token each
        if store.templates is not None:
            templates = (store.meta.get("text") or {}).get("templates") or []
            if len(templates) != store.templates.shape[1]:
                raise InputError(f"{store.path / 'meta.json'}: text.templates lists {len(templates)} templates, "
                                 f"text/templates.npy holds {store.templates.shape[1]} per class")
            return [([t.format(name) for t in templates], list(range(len(templates)))) for name in run.names]
        return [([f"the class prompt of '{name}'"], [0]) for name in run.names]
    from spacil.describe.descriptions import load_descriptions

    path = _descriptions_file(store, descriptions)
    by_name = {normalise_name(n): s for n, s in load_descriptions(path).sentences.items()}
    word = ((store.meta.get("text") or {}).get("semantic_tokens")) == "word"
    counts = store.description_mask.sum(axis=1) if store.description_mask is not None else np.zeros(store.num_classes, int)
    result = {}
    for c, name in enumerate(store.classes):
        sentences = by_name.get(normalise_name(name), [])
        sentence_of = [i for i, s in enumerate(sentences) for _ in range(_word_count(backbone, s) if word else 1)]
        if len(sentence_of) != int(counts[c]):
            unit = "word tokens" if word else "sentences"
            raise InputError(f"{path}: class '{name}' has {len(sentence_of)} {unit}, the store's embeddings "
                             f"(text/descriptions.npy) {int(counts[c])}; not the file the store was made from")
        result[c] = (sentences, sentence_of) if sentences else (["(no descriptions)"], [0])
    return [result[c] for c in run.class_index]


def _word_count(backbone, text: str) -> int:
    """Word tokens `FrozenCLIP.encode_text_tokens` yields for `text` (its positions without punctuation-only tokens)."""
    return len(backbone.word_token_positions(backbone.tokenizer([text])[0]))


# ----------------------------------------------------------------------------------------------------------------------
# The numbers


def _shows(learner: Learner) -> str:
    if not isinstance(learner, SPA):
        return "class scores only"
    if not learner.ablation.patch_branch:
        return "global score only (no patch branch)"
    parts = ["random patches" if not learner.ablation.semantic_selection else "top-k patches by relevance",
             "the uniform plan (no OT)" if not learner.ablation.optimal_transport else "the OT plan"]
    if learner.knobs.class_shortlist:
        count = learner.knobs.class_shortlist
        listed = "the class" if count == 1 else f"the {count} classes"
        parts.append(f"patches scored for {listed} of highest global score")
    return ", ".join(parts)


def explain_features(run: LoadedRun, global_: torch.Tensor, patches: torch.Tensor, sentences: Optional[list], top: int,
                     given: Optional[list[Optional[int]]] = None) -> list[dict]:
    """global_ [B, d], patches [B, N, d] (float32 on the run's device) -> one record per image: the scores the learner
    predicts with and, for SPA's patch branch, the picked patches, relevance and plan of the predicted class (and of the
    given class, a logit column, when set)."""
    learner = run.learner
    batch = FeatureBatch(global_, patches if learner.needs_patches else None)
    scores = learner.explain(batch) if isinstance(learner, SPA) else None
    with torch.no_grad():
        logits = scores.logits if scores is not None else learner.logits(batch)
    logits = logits.cpu()
    names = run.names
    records = []
    for b in range(len(global_)):
        order = torch.argsort(logits[b], descending=True, stable=True).tolist()
        record = {"method": learner.name, "label": learner.label, "shows": _shows(learner),
                  "logit_scale": learner.context.logit_scale, "classes": names, "logits": logits[b].tolist(),
                  "predicted": names[order[0]]}
        if learner.context.logit_bias:  # SigLIP's: in every logit, beside the parts below (docs/backbones.md)
            record["logit_bias"] = learner.context.logit_bias
        if scores is not None:
            record["patch_weight"] = learner.knobs.patch_weight
            record["global"] = scores.global_[b].cpu().tolist()
            record["patch"] = None if scores.patch is None else scores.patch[b].cpu().tolist()
        record["top"] = [{"class": names[c], "logit": record["logits"][c],
                          **({"global": record["global"][c], "patch": record["patch"][c] if record["patch"] else None}
                             if scores is not None else {})} for c in order[:top]]
        record["explained"] = []
        if scores is not None and scores.plan is not None:
            wanted = given[b] if given else None
            drawn = [("predicted and given" if wanted == order[0] else "predicted", order[0])]
            if wanted is not None and wanted != order[0]:
                drawn.append(("given", wanted))
            # with spa.class_shortlist, a class outside the image's shortlist has no patch evidence (its patch score is the
            # stand-in): it is listed in `outside_shortlist` instead
            record["explained"] = [_patch_record(learner, scores, b, column, names[column], role, sentences)
                                   for role, column in drawn if scores.slot(b, column) is not None]
            record["outside_shortlist"] = [names[column] for _, column in drawn if scores.slot(b, column) is None]
        records.append(record)
    return records


def _patch_record(learner: SPA, scores, b: int, column: int, name: str, role: str, sentences) -> dict:
    real = learner.semantic_mask[column].cpu()
    slot = scores.slot(b, column)  # the column itself unless the scores hold a class shortlist
    plan = scores.plan[b, slot].cpu()[:, real]  # [k, real tokens]
    texts, sentence_of = sentences[column] if sentences else ([], [])
    return {"class": name, "column": column, "role": role, "picked": scores.indices[b, slot].cpu().tolist(),
            "relevance": scores.relevance[b, slot].cpu().tolist(), "plan": plan.tolist(),
            "sentences": texts, "token_sentence": sentence_of}


# ----------------------------------------------------------------------------------------------------------------------
# The picture


def panels_of(record: dict) -> list[str]:
    """The figure's panels, left to right (PANEL_WIDTHS gives their widths): the given class's sentences when it is not the
    predicted one, the photo, the predicted class's sentences (with a patch branch), the class scores."""
    explained = record["explained"]
    return ["sentences"] * (len(explained) > 1) + ["photo"] + ["sentences"] * bool(explained) + ["scores"]


def draw(image, record: dict, path: str | Path, grid: tuple[int, int]) -> None:
    """Write the explanation figure of one image (a PIL image) to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spacil.plotstyle import fonts_for

    with fonts_for(_strings(record)) as shown:  # class names and sentences may be in any script
        fig = _figure(image, _displayed(record, shown), grid)
    try:
        atomic_save_figure(path, fig, dpi=DPI)
    finally:
        plt.close(fig)


def _strings(value) -> list[str]:
    """Every string in a record (dicts, lists), keys left out."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings(item)]
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in _strings(item)]
    return []


def _displayed(value, shown):
    """A copy of a record with every string as the figure draws it (`shown`: spacil.plotstyle.fonts_for's)."""
    if isinstance(value, str):
        return shown(value)
    if isinstance(value, dict):
        return {key: _displayed(item, shown) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_displayed(item, shown) for item in value]
    return value


def _figure(image, record: dict, grid: tuple[int, int]):
    """The explanation figure of one image (a PIL image), every string of `record` as it is drawn."""
    import matplotlib
    import matplotlib.pyplot as plt

    panels = panels_of(record)
    widths = [PANEL_WIDTHS[p] for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths), HEIGHT), dpi=DPI, gridspec_kw={"width_ratios": widths})
    photo = image.convert("RGB")
    photo.thumbnail((DISPLAY_PIXELS, DISPLAY_PIXELS))
    width, height = photo.size
    ax = axes[panels.index("photo")]
    ax.imshow(np.asarray(photo), extent=(0, width, height, 0))
    rows, cols = grid
    cell = (width / cols, height / rows)
    for x in np.arange(1, cols) * cell[0]:
        ax.axvline(x, color="white", lw=0.3, alpha=0.6)
    for y in np.arange(1, rows) * cell[1]:
        ax.axhline(y, color="white", lw=0.3, alpha=0.6)
    colours = {"predicted": "cyan", "predicted and given": "cyan", "given": "lime"}
    for index, explained in enumerate(record["explained"]):
        if index == 0:
            heat = np.asarray(explained["relevance"]).reshape(rows, cols)
            shown = ax.imshow(heat, extent=(0, width, height, 0), cmap="inferno", alpha=0.45, interpolation="nearest")
            bar = fig.colorbar(shown, ax=ax, orientation="horizontal", fraction=0.05, pad=0.03)
            bar.ax.tick_params(labelsize=5)
            bar.set_label(f"patch relevance to '{explained['class']}'", fontsize=6)
        for patch in explained["picked"]:
            ax.add_patch(matplotlib.patches.Rectangle(((patch % cols) * cell[0], (patch // cols) * cell[1]), *cell, fill=False,
                                                      edgecolor=colours[explained["role"]], lw=1.6,
                                                      linestyle="--" if explained["role"] == "given" else "-"))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{record['label']}: predicts '{record['predicted']}'\n{record['shows']}", fontsize=7)
    sentence_axes = [axes[i] for i, p in enumerate(panels) if p == "sentences"][::-1]  # the predicted class's on the right
    for ax_text, explained in zip(sentence_axes, record["explained"]):
        _draw_sentences(fig, ax_text, ax, explained, cell, cols, colours[explained["role"]], right_of_photo=ax_text is not axes[0])
    _draw_scores(axes[-1], record)
    fig.subplots_adjust(left=0.01, right=0.97, top=0.88, bottom=0.08, wspace=0.1)
    return fig


def _draw_sentences(fig, ax, photo_ax, explained: dict, cell, cols: int, colour: str, right_of_photo: bool) -> None:
    """The class's sentences, each linked to the patches its plan column sends most mass to (line width = mass); `right_of_photo`:
    the panel is right of the photo (lines leave the sentences' left end)."""
    from matplotlib.patches import ConnectionPatch

    ax.axis("off")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{explained['role']}: '{explained['class']}'\nline width = transport plan mass", fontsize=7)
    plan = np.asarray(explained["plan"], dtype=float)  # [k, tokens]
    sentences, sentence_of = explained["sentences"], explained["token_sentence"]
    mass = np.zeros((len(plan), len(sentences)))
    for token, sentence in enumerate(sentence_of):
        mass[:, sentence] += plan[:, token]
    peak = mass.max() if mass.size and mass.max() > 0 else 1.0
    count = max(len(sentences), 1)
    size = 7 if count <= 8 else 5.5
    anchor = 0.05 if right_of_photo else 0.95
    for i, sentence in enumerate(sentences):
        y = 1 - (i + 0.5) / count
        ax.text(anchor + (0.01 if right_of_photo else -0.01), y, textwrap.fill(sentence, 58), fontsize=size, va="center",
                ha="left" if right_of_photo else "right")
        for k in np.argsort(-mass[:, i], kind="stable")[:LINKS_PER_SENTENCE]:
            if mass[k, i] <= 0:
                continue
            patch = explained["picked"][k]
            centre = ((patch % cols + 0.5) * cell[0], (patch // cols + 0.5) * cell[1])
            fig.add_artist(ConnectionPatch(xyA=(anchor, y), coordsA=ax.transData, xyB=centre, coordsB=photo_ax.transData,
                                           color=colour, alpha=0.7, lw=0.3 + 3.5 * mass[k, i] / peak))


def _draw_scores(ax, record: dict) -> None:
    """The top classes' logits (black marks); for SPA beside the two parts they add up to: logit_scale * global score and
    logit_scale * patch_weight * patch score."""
    top = record["top"][::-1]
    y = np.arange(len(top))
    scale = record["logit_scale"]
    logits = [t["logit"] for t in top]
    if "global" in record:
        ax.barh(y + 0.2, [scale * t["global"] for t in top], height=0.38, color="tab:blue", label="global part")
        if record.get("patch") is not None:
            ax.barh(y - 0.2, [scale * record["patch_weight"] * t["patch"] for t in top], height=0.38, color="tab:orange",
                    label="patch part")
        ax.plot(logits, y, "D", color="black", markersize=4, label="logit")
        ax.legend(fontsize=6, loc="best")
    else:
        ax.barh(y, logits, color="tab:gray", label="logit")
    ax.axvline(0, color="black", lw=0.5)
    ax.set_yticks(y, [f"{textwrap.shorten(t['class'], 22)} ({t['logit']:.2f})" for t in top], fontsize=6)
    ax.tick_params(axis="x", labelsize=6)
    bias = f" + bias {record['logit_bias']:g}" if record.get("logit_bias") else ""
    ax.set_title("top classes: logit" + (" = global + patch part" + bias if "global" in record else ""), fontsize=7)


# ----------------------------------------------------------------------------------------------------------------------
# The command


def _output_stems(names: Sequence[str]) -> list[str]:
    """One distinct file stem per image."""
    stems, seen = [], {}
    for name in names:
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "image"
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def _parse_row(text: str, store: FeatureStore) -> tuple[str, int]:
    split, _, index = text.partition(":")
    if split not in ("train", "test") or not index.isdigit():
        raise InputError(f"--row {text}: expected SPLIT:INDEX, e.g. test:12 (SPLIT train or test)")
    if int(index) >= len(store.split(split)):
        raise InputError(f"--row {text}: split '{split}' of {store.path} has {len(store.split(split))} rows")
    return split, int(index)


def _read_images(run: LoadedRun, images: Sequence[str | Path], rows: Sequence[str]):
    """-> (PIL images, their names, their true class's logit column or None, where they come from): files first, then
    stored rows (whose true class the store knows)."""
    from PIL import Image, UnidentifiedImageError

    from spacil.data import open_store_image

    pictures, labels, truth, sources = [], [], [], []
    for item in images:
        path = Path(item)
        try:
            with Image.open(path) as handle:
                pictures.append(handle.convert("RGB"))
        except (OSError, UnidentifiedImageError) as err:
            raise InputError(f"{path}: not a readable image ({type(err).__name__})") from None
        labels.append(path.stem)
        truth.append(None)
        sources.append(str(path))
    column_of = {c: i for i, c in enumerate(run.class_index)}
    for text in rows:
        split, index = _parse_row(text, run.store)
        pictures.append(open_store_image(run.store, split, index))
        labels.append(f"{split}_{index}")
        truth.append(column_of.get(int(run.store.split(split).labels[index])))
        sources.append(f"{text} ({Path(run.store.meta.get('image_root', '')) / run.store.image_paths(split)[index]})")
    if not pictures:
        raise InputError("explain: no image given (IMAGE files or --row SPLIT:INDEX)")
    return pictures, labels, truth, sources


def explain_images(run_dir: str | Path, images: Sequence[str | Path] = (), store: Optional[str | Path] = None,
                   class_name: Optional[str] = None, top: int = 5, out: str | Path = "explain", device: str = "auto",
                   descriptions: Optional[str | Path] = None, rows: Sequence[str] = (), pretrained: Optional[str] = None,
                   echo: Callable[[str], None] = print) -> list[Path]:
    """Write `<image>.png` and `<image>.json` per image (a file, or a stored row `SPLIT:INDEX`, whose true class is drawn
    as `--class` is) to `out`; returns the JSON paths."""
    from spacil.store.extract import encode_pil_images

    if top < 1:
        raise InputError(f"--top {top}: expected at least 1")
    run = load_run(run_dir, store, device)
    pictures, labels, given, sources = _read_images(run, images, rows)
    if class_name is not None:
        wanted = normalise_name(class_name)
        matches = [i for i, n in enumerate(run.names) if normalise_name(n) == wanted]
        if not matches:
            raise InputError(f"--class {class_name}: not a class this run has seen ({len(run.names)} classes, e.g. "
                             f"'{run.names[0]}')")
        given = [matches[0]] * len(pictures)
    backbone = load_backbone(run.store, run.device, pretrained)
    learner = run.learner
    patch_branch = isinstance(learner, SPA) and learner.ablation.patch_branch
    if not isinstance(learner, SPA):
        echo(f"explain: {learner.label} has no patch-level evidence; drawing its class scores only")
    sentences = token_sentences(run, backbone, descriptions) if patch_branch else None
    dtype = str(run.store.split("test").global_.dtype)
    records = []
    for start in range(0, len(pictures), IMAGES_PER_BATCH):
        with torch.no_grad():
            global_, patches = encode_pil_images(backbone, pictures[start:start + IMAGES_PER_BATCH], dtype)
        records += explain_features(run, global_.to(run.device), patches.to(run.device), sentences, top,
                                    None if given is None else given[start:start + IMAGES_PER_BATCH])
    grid = tuple(int(g) for g in backbone.grid)  # the family's own patch grid (rows, columns)
    out = Path(out)
    make_dirs(out)
    written = []
    for source, picture, record, stem in zip(sources, pictures, records, _output_stems(labels)):
        record = {"image": source, "grid": list(grid), **record, "panels": panels_of(record)}
        draw(backbone.preprocess.as_seen(picture), record, out / f"{stem}.png", grid)
        atomic_write_text(out / f"{stem}.json", json.dumps(record, indent=1))
        written.append(out / f"{stem}.json")
        echo(f"{source}: predicted '{record['predicted']}' -> {out / stem}.png")
    return written
