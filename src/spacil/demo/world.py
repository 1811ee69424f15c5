"""The demo world: a deterministic, generated feature store in which classes differ by local parts (docs/demo.md).

Shape of the world (all vectors unit length, dimension d):
- Classes come in families. A class's global appearance is its family's direction plus a small class-specific offset, so the
  global embedding g(x) tells families apart easily and siblings only partly: global-only methods score well above chance
  but confuse siblings.
- Each family owns a small vocabulary of parts; each class shows a few of them (siblings share some, never all). An image's
  patch tokens are mostly shared background; a few patches, at random places, show the class's parts.
- Each class has descriptions: one per part it shows (the part's text direction) and one general sentence.
- Image-side shift: every image feature (global and patches) is rotated and shifted away from the text side, as CLIP's modality
  gap and a domain change would; a linear image projector can learn to undo it, frozen zero-shot matching suffers from it.
- Pre-projection features: a random projection [width, d] and, per image, a z with normalise(z @ projection) = g (g lifted
  through the projection's pseudo-inverse, at a random scale, plus a part the projection maps to zero), and norms of the
  text features before normalisation. They are drawn after everything else, so every other array is what it was before
  they existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spacil.fileio import atomic_save_npy, make_dirs
from spacil.store.format import VIEWS_GLOBAL_FILE, write_store
from spacil.store.pairwise import write_pairwise


@dataclass(frozen=True)
class WorldSpec:
    num_classes: int = 60
    family_size: int = 6
    parts_per_family: int = 8
    parts_per_class: int = 3
    dim: int = 64
    grid: int = 7  # patches per side: N = grid * grid
    train_per_class: int = 40
    test_per_class: int = 20
    class_offset: float = 0.35  # how far a class's global direction leaves its family's
    global_noise: float = 0.8
    patch_noise: float = 0.35
    background_textures: int = 6
    image_shift: float = 1.0  # strength of the image-side rotation and offset
    width: int = 96  # z's dimension (before the projection to d)
    seed: int = 7
    views: int = 10  # stored views of each training image (ENGINE's image-augmentation term)
    area_views: int = 2  # AREA's stored occlusion and area-augment views of each training image (each)
    area_sentences: int = 8  # sentences per class in each of AREA's description sets
    view_noise: float = 0.5  # how far a view's global feature moves (relative to the class noise)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def lift_to_pre_projection(global_: np.ndarray, proj: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """g [n, d] (unit rows), proj [width, d] (rank d) -> z [n, width] float32 with normalise(z @ proj) = g: g through
    proj's pseudo-inverse at a random scale per row (0.5 to 2), plus a random part of the same size in proj's left null
    space (z @ proj does not see it), so z is neither normalised nor a plain lift of g."""
    lifted = np.asarray(global_, dtype=np.float64) @ np.linalg.pinv(proj)
    basis, _ = np.linalg.qr(proj)  # [width, d]: orthonormal columns spanning proj's columns
    null = rng.normal(size=lifted.shape)
    null -= (null @ basis) @ basis.T
    null *= np.linalg.norm(lifted, axis=-1, keepdims=True) / np.linalg.norm(null, axis=-1, keepdims=True)
    scale = rng.uniform(0.5, 2.0, size=(len(lifted), 1))
    return (scale * (lifted + null)).astype(np.float32)


def make_world(path: str | Path, spec: WorldSpec = WorldSpec()) -> dict:
    """Write the demo store at `path`; return what the pictures need (where each image's parts are)."""
    rng = np.random.default_rng(spec.seed)
    d, n_patches = spec.dim, spec.grid * spec.grid
    families = spec.num_classes // spec.family_size
    family_dirs = _unit(rng.normal(size=(families, d)))
    class_family = np.repeat(np.arange(families), spec.family_size)
    class_dirs = _unit(family_dirs[class_family] + spec.class_offset * _unit(rng.normal(size=(spec.num_classes, d))))
    part_dirs = _unit(rng.normal(size=(families, spec.parts_per_family, d)))
    class_parts = np.stack([rng.choice(spec.parts_per_family, spec.parts_per_class, replace=False) for _ in range(spec.num_classes)])
    textures = _unit(rng.normal(size=(spec.background_textures, d)))
    # the image-side shift: a random rotation towards a fixed offset, applied to every image feature
    rotation, upper = np.linalg.qr(np.eye(d) + spec.image_shift * rng.normal(size=(d, d)) / np.sqrt(d))
    rotation = rotation * np.sign(np.diag(upper))  # the rotation nearest the identity, not a reflection of it
    offset = spec.image_shift * _unit(rng.normal(size=d)) * 0.5

    def to_image_space(x: np.ndarray) -> np.ndarray:
        return _unit(x @ rotation.T + offset)

    def split(per_class: int):
        labels = np.repeat(np.arange(spec.num_classes), per_class)
        n = len(labels)
        global_ = to_image_space(class_dirs[labels] + spec.global_noise * rng.normal(size=(n, d)) / np.sqrt(d) * 2)
        texture = textures[rng.integers(spec.background_textures, size=(n, n_patches))]
        patches = texture + spec.patch_noise * rng.normal(size=(n, n_patches, d)) / np.sqrt(d) * 2
        locations = np.zeros((n, spec.parts_per_class), dtype=np.int64)
        for i, c in enumerate(labels):
            where = rng.choice(n_patches, spec.parts_per_class, replace=False)
            locations[i] = where
            patches[i, where] = part_dirs[class_family[c], class_parts[c]] + spec.patch_noise * rng.normal(size=(spec.parts_per_class, d)) / np.sqrt(d) * 2
        return global_.astype(np.float16), to_image_space(patches).astype(np.float16), labels, locations

    train = split(spec.train_per_class)
    test = split(spec.test_per_class)
    # text side: prompts near the class direction, descriptions = one per shown part plus a general one
    prompts = _unit(class_dirs + 0.15 * _unit(rng.normal(size=(spec.num_classes, d))))
    part_text = _unit(part_dirs[class_family[:, None], class_parts] + 0.15 * _unit(rng.normal(size=(spec.num_classes, spec.parts_per_class, d))))
    general = _unit(class_dirs + 0.2 * _unit(rng.normal(size=(spec.num_classes, d))))[:, None]
    descriptions = np.concatenate([part_text, general], axis=1).astype(np.float32)
    mask = np.ones(descriptions.shape[:2], dtype=bool)
    templates = _unit(prompts[:, None] + 0.1 * _unit(rng.normal(size=(spec.num_classes, 3, d)))).astype(np.float32)
    names = [f"family{class_family[c]:02d}-species{c % spec.family_size}" for c in range(spec.num_classes)]
    # the pre-projection extension, drawn last (every array above keeps its bytes)
    visual_proj = (rng.normal(size=(spec.width, d)) / np.sqrt(spec.width)).astype(np.float32)
    global_pre = {name: lift_to_pre_projection(rows[0].astype(np.float32), visual_proj, rng).astype(np.float16)
                  for name, rows in (("train", train), ("test", test))}
    template_norms = rng.uniform(5.0, 15.0, size=templates.shape[:2]).astype(np.float32)
    # ENGINE's inputs, drawn after everything else (every array above keeps its bytes): pairwise descriptions, and views
    # of every training image (its global feature moved by noise, as a noisy copy of the image would move it)
    engine_rng = np.random.default_rng([spec.seed, 19])
    write_pairwise(path, *pairwise_descriptions(class_family, class_parts, part_text, general, engine_rng))
    train_global = train[0].astype(np.float32)
    noisy = train_global[:, None] + spec.view_noise * engine_rng.normal(size=(len(train_global), spec.views, d)) / np.sqrt(d)
    make_dirs(Path(path) / "train")
    atomic_save_npy(Path(path) / VIEWS_GLOBAL_FILE, _unit(noisy).astype(np.float16))
    views = {"count": spec.views, "transform": "generated", "params": {"noise": spec.view_noise}, "seed": spec.seed,
             "arrays": [VIEWS_GLOBAL_FILE]}
    area_meta = write_area_inputs(path, spec, class_dirs, part_text, general, prompts, templates, train[0],
                                  visual_proj, np.random.default_rng([spec.seed, 25]))
    write_store(
        path, classes=names, dataset="demo", backbone={"model": "demo-world", "pretrained": None, "logit_scale": 100.0},
        splits={"train": train[:3], "test": test[:3]}, prompts=prompts.astype(np.float32), templates=templates,
        descriptions=(descriptions, mask), global_pre=global_pre, visual_proj=visual_proj, template_norms=template_norms,
        extra_meta={"views": views, **area_meta,
                    "text": {"semantic_tokens": "sentence", "descriptions_source": "generated", "pairwise_source": "generated"},
                    "generator": {"name": "spacil demo world", **spec.__dict__}},
    )
    return {"test_part_locations": test[3], "class_parts": class_parts, "grid": spec.grid, "names": names}


def pairwise_descriptions(class_family: np.ndarray, class_parts: np.ndarray, part_text: np.ndarray, general: np.ndarray,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ENGINE's pairwise descriptions of the world (store/pairwise.py layout): des[a][b] holds the text of every part class
    a shows and class b does not (b a sibling: the parts they do not share; b of another family: all of a's parts), and
    des[a][a] a's general sentence with all its parts. part_text [C, P, d] and general [C, 1, d] are unit vectors.

    -> (units [C, C, P + 1, d], norms [C, C, P + 1] drawn in [6, 10] like a CLIP text feature's, mask [C, C, P + 1])."""
    classes, parts, dim = part_text.shape
    units = np.zeros((classes, classes, parts + 1, dim), dtype=np.float32)
    mask = np.zeros((classes, classes, parts + 1), dtype=bool)
    for a in range(classes):
        for b in range(classes):
            if a == b:
                chosen = np.concatenate([general[a], part_text[a]])
            else:
                other = set(class_parts[b].tolist()) if class_family[a] == class_family[b] else set()
                chosen = part_text[a][[i for i, part in enumerate(class_parts[a]) if part not in other]]
            units[a, b, :len(chosen)] = chosen
            mask[a, b, :len(chosen)] = True
    norms = (rng.uniform(6, 10, size=mask.shape) * mask).astype(np.float32)
    return units, norms, mask


def write_area_inputs(path: str | Path, spec: WorldSpec, class_dirs: np.ndarray, part_text: np.ndarray,
                      general: np.ndarray, prompts: np.ndarray, templates: np.ndarray, train_global: np.ndarray,
                      visual_proj: np.ndarray, rng: np.random.Generator) -> dict:
    """AREA's inputs of the world, drawn after everything else from their own generator (every other array keeps its
    bytes): occlusion views (the feature pulled towards a random occluder direction), area-augment views (a small move),
    both as z; the clean, occluded and augmented description sets (each sentence a mix of one of the class's parts or its
    general sentence with noise; occluded ones with an occluder direction, augmented ones with a colour direction) and the
    two prompts. -> the meta.json entries that name them."""
    from spacil.store.area_texts import AREA_SETS, area_text_files
    from spacil.store.format import view_set_files

    path = Path(path)
    d = spec.dim
    g = np.asarray(train_global, dtype=np.float32)
    occluder, colour = _unit(rng.normal(size=(2, d)))
    view_sets = {}
    for transform, move in (("occlusion", lambda: 0.8 * occluder + 0.5 * rng.normal(size=(len(g), d)) / np.sqrt(d)),
                            ("area-augment", lambda: 0.3 * colour + 0.3 * rng.normal(size=(len(g), d)) / np.sqrt(d))):
        views = np.stack([_unit(g + move()) for _ in range(spec.area_views)], axis=1)  # [n, V, d]
        z = np.stack([lift_to_pre_projection(views[:, v], visual_proj, rng) for v in range(spec.area_views)], axis=1)
        g_file, z_file = view_set_files(transform)
        make_dirs(path / "train")
        atomic_save_npy(path / g_file, views.astype(np.float16))
        atomic_save_npy(path / z_file, z.astype(np.float16))
        view_sets[transform] = {"count": spec.area_views, "transform": transform, "params": {"generated": True},
                                "seed": spec.seed, "arrays": [g_file, z_file]}
    sources = np.concatenate([part_text, general], axis=1)  # [C, P + 1, d]
    classes, count = len(class_dirs), spec.area_sentences
    sets = {}
    for name, shift in (("clean", None), ("occluded", occluder), ("augmented", colour)):
        pick = sources[np.arange(classes)[:, None], rng.integers(sources.shape[1], size=(classes, count))]
        mixed = pick + 0.3 * rng.normal(size=pick.shape) / np.sqrt(d) * 2
        if shift is not None:
            mixed = mixed + 0.5 * shift
        sets[name] = _unit(mixed)
    sets["name_prompt"] = prompts[:, None]
    sets["photo_prompt"] = templates[:, :1]
    make_dirs(path / "text")
    for name in AREA_SETS:
        units = np.asarray(sets[name], dtype=np.float32)
        features, norms, mask = area_text_files(name)
        atomic_save_npy(path / features, units)
        atomic_save_npy(path / norms, rng.uniform(6, 10, size=units.shape[:2]).astype(np.float32))
        atomic_save_npy(path / mask, np.ones(units.shape[:2], dtype=bool))
    return {"view_sets": view_sets, "area_texts": {"source": "generated", "sets": list(AREA_SETS)}}
