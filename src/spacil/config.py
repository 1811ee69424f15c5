"""The typed run configuration: every knob of SPEC.md with its default, unknown keys rejected.

A config is a YAML file with the sections below (all optional). `--set KEY=VALUE` overrides one value; KEY is either the dotted
path (`spa.top_k_patches`) or a leaf name that is unique across sections (`top_k_patches`). The resolved config is written
with every run as `config.yaml`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spacil.errors import InputError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the features come from and how the classes are split into tasks."""

    dataset: str = "cifar224"  # a benchmark key, or folder:NAME for an ImageFolder tree <data_root>/NAME (docs/data.md)
    features: Optional[str] = None  # a feature store (INTERFACES.md); when set, nothing else is read
    data_root: Optional[str] = None  # used to extract a store when `features` does not exist yet
    model: str = "ViT-B-16"
    pretrained: Optional[str] = "laion400m_e32"  # a tag of open_clip or a local checkpoint file
    descriptions: Optional[str] = None  # a descriptions file whose sentences become semantic tokens at extraction
    names_file: Optional[str] = None  # optional class names to check against the folders (never shifts names)
    class_names: Optional[str] = None  # class names by folder index (JSON list, {dataset: [names]}, or one per line)
    templates: Optional[str] = None  # prompt templates replacing the data set's (JSON list or one per line, with {})
    # ENGINE's inputs, added to the store when it lacks them (store/pairwise.py, store/views.py): a pairwise descriptions
    # file (ENGINE's JSON format), and `views` stored views of every training image under `view_transform`
    pairwise_descriptions: Optional[str] = None
    views: int = Field(0, ge=0)
    view_transform: Literal["gaussian-noise", "flip-jitter", "occlusion", "area-augment"] = "gaussian-noise"
    view_noise: float = Field(0.25, ge=0)  # gaussian-noise's std
    view_seed: int = 0
    area_descriptions: Optional[str] = None  # AREA's description sets file, encoded into the store when it lacks them
    area_views: int = Field(0, ge=0)  # AREA's views: that many occlusion and that many area-augment views, added when missing
    init_cls: int = Field(10, ge=1)
    increment: int = Field(10, ge=1)
    shuffle: bool = True  # class order = np.random.seed(seed); np.random.permutation(C)


class SPAConfig(_Section):
    """The knobs of SPEC.md, sections 1-7."""

    visual_samples: int = Field(6, ge=1)
    sample_strategy: Literal["kmeans", "fps", "random"] = "kmeans"
    num_descriptions: int = Field(8, ge=1)
    semantic_tokens: Literal["sentence", "word"] = "sentence"
    relevance: Literal["max", "mean"] = "max"
    top_k_patches: int = Field(16, ge=1)
    patch_weights: Literal["uniform", "relevance"] = "uniform"
    relevance_temperature: float = Field(0.1, gt=0)  # softmax(r / 0.1) when patch_weights=relevance
    ot_epsilon: float = Field(0.1, gt=0)
    ot_iters: int = Field(100, ge=1)
    ot_grad: Literal["detach", "unroll"] = "detach"
    projector: Literal["linear", "mlp"] = "linear"
    patch_weight: float = Field(1.0, ge=0)
    cov_shrink: float = Field(1e-4, ge=0)
    cov_type: Literal["full", "diag"] = "full"
    pseudo_per_class: int = Field(4, ge=0)
    # Beyond the paper (SPEC.md; docs/method.md, "SPA at scale"): the patch branch for each sample's N classes of highest
    # global score only (0: every seen class, exact SPA), and P pseudo-samples per batch over the old classes instead of
    # pseudo_per_class per old class (0: pseudo_per_class)
    # (strict: a YAML true is not a count)
    class_shortlist: int = Field(0, ge=0, strict=True)
    pseudo_per_batch: int = Field(0, ge=0, strict=True)


class AblationConfig(_Section):
    """Switch SPA's parts off one by one (SPEC.md, 'Ablations'). All true = full SPA."""

    patch_branch: bool = True  # false: global-only logits
    optimal_transport: bool = True  # false: mean of the top-k cosines (a uniform plan) instead of OT
    semantic_selection: bool = True  # false: k random patches instead of the most relevant ones
    projectors: bool = True  # false: frozen CLIP space, nothing trains
    gaussian_calibration: bool = True  # false: no pseudo-features of old classes
    llm_descriptions: bool = True  # false: template-only semantic tokens


class TrainConfig(_Section):
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.05, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    batch_size: int = Field(64, ge=1)
    epochs: int = Field(10, ge=0)
    eval_batch_size: int = Field(256, ge=1)
    # GiB of device memory a task's feature rows may occupy on a GPU (train rows per task, test rows per evaluation);
    # null: half of the device's free memory when the task starts. Rows beyond it stream in batch by batch. Unused on CPU.
    # The same figure bounds the working memory of one chunk of SPA's scoring, on the CPU too (spacil.devices.working_memory),
    # never below 64 MiB: 0 streams every row but still scores in 64 MiB chunks (smaller ones are slow, not leaner). Finite.
    device_memory_budget: Optional[float] = Field(None, ge=0, allow_inf_nan=False)


class ProofConfig(_Section):
    """PROOF (methods/proof.py). Training defaults are the values the official exps/*.json set (lr 0.001, weight decay 0.05,
    min_lr 0: all of them; batch 64: all but two), not the code's fallbacks (lr 0.01, batch 48, weight decay 0.0005, min_lr 1e-8), which no official
    run uses and under which training is unstable (docs/method.md, "PROOF"); the packaged configs set each data set's values.
    PROOF trains with these, not with the `train:` section (its keys have other names so that bare `--set` names of `train:`
    stay unique)."""

    tuned_epoch: int = Field(5, ge=0)  # epochs per task
    init_lr: float = Field(0.001, gt=0)
    min_lr: float = Field(0.0, ge=0)  # eta_min of the per-epoch cosine schedule
    tuned_batch_size: int = Field(64, ge=1)  # training batches, and the chunks prediction fuses together (official test loader)
    tuned_weight_decay: float = Field(0.05, ge=0)
    tuned_optimizer: Literal["sgd", "adam"] = "sgd"  # adam = AdamW, as in the official code
    tuned_momentum: float = Field(0.9, ge=0, lt=1)  # SGD only
    projection_type: Literal["pure_mlp"] = "pure_mlp"  # one Linear(d, d) per task and modality (the only type implemented)
    context_prompt_length_per_task: int = Field(3, ge=0)
    attention_dropout: float = Field(0.1, ge=0, lt=1)  # on the attention weights and the fusion output, training only
    memory_per_class: int = Field(20, ge=0)  # exemplars per class when fixed_memory
    memory_size: int = Field(2000, ge=0)  # total exemplars when not fixed_memory: memory_size // seen classes per class
    fixed_memory: bool = True
    text_features: Literal["templates", "prompts"] = "templates"  # templates: template 0 in training, per-template at test
    fusion_batch_mean: bool = True  # official: fused text/prototypes are averaged over the batch; false: per image
    normalize_eval_image: bool = False  # official: the projected image feature enters prediction unnormalised
    train_old_text_projections: bool = True  # official: every task's text projection keeps training
    train_logit_scale: bool = True  # official: CLIP's logit scale (in the contrastive loss) trains
    # official: the old tasks' frozen image projections and context prompts stay under the optimizer's weight decay (SGD over
    # all parameters, torch 1.11 zero_grad: they keep a zero gradient) and shrink at every later step; false: frozen exactly
    decay_frozen: bool = True


class LLMConfig(_Section):
    """The multimodal LLM of SPEC.md section 2 (used by `spacil describe`)."""

    model: str = "gpt-5"
    base_url: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = Field(4, ge=1)
    timeout: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)  # per request, on 429, 5xx and timeouts
    max_attempts: int = Field(3, ge=1)  # per class, when an answer fails validation


class RAPFConfig(_Section):
    """RAPF's knobs (Huang et al., ECCV 2024). Defaults: the official configs/class/cifar100_10-10.yaml and the constants of
    its main.py and continual_clip/models.py (official names where they do not clash with another section's leaf)."""

    adapter_lr: float = Field(0.001, gt=0)  # official `lr` (Adam)
    adapter_weight_decay: float = Field(0.0, ge=0)  # main.py: Adam(..., weight_decay=0.0)
    adapter_epochs: int = Field(15, ge=0)  # official `epochs`
    adapter_batch_size: int = Field(100, ge=1)  # official `train_batch_size`
    milestones: list[int] = Field(default_factory=lambda: [4, 10])  # MultiStepLR milestones, in epochs
    lr_gamma: float = Field(0.1, gt=0)  # main.py: MultiStepLR(..., gamma=0.1)
    beta: float = Field(2.0, ge=0)  # draws: int(replay_per_class * beta) per replayed class, int(edge_per_pair * beta) per hard pair
    replay_per_class: int = Field(10, ge=0)  # main.py: int(10 * beta)
    edge_per_pair: int = Field(20, ge=0)  # main.py: int(20 * beta)
    replay_classes_per_batch: int = Field(2, ge=1)  # main.py's list_for_one_batch: 2; 4 (CIFAR-100 Inc5), 5 (ImageNet-R), 10 (CUB)
    threshold: float = Field(0.55, ge=0)  # hard pair: distance of the unit text features below this
    margin: float = Field(0.1, ge=0)  # main.py's hinge: relu(-<f,t_old> + <f,t_new> + 0.1)
    mix_bias: float = 0.6  # fusion mask = clamp(|difference| / max + mix_bias, max=1)
    shrinkage: bool = False  # models.py shrink_cov before sampling
    cov_ridge: float = Field(1e-4, ge=0)  # models.py analyze_mean_cov: torch.cov(...) + 1e-4 * I


class RanPACConfig(_Section):
    """RanPAC (McDonnell et al., NeurIPS 2023; methods/ranpac.py). Defaults: the official args/*_publish.csv rows of its CLIP
    runs (`ncm`, `use_RP` true, M 10000) and the constants of RanPAC.py `optimise_ridge_parameter`."""

    M: int = Field(10000, ge=0)  # random-projection width; 0: no projection (the official M = 0 row: z decorrelated only)
    ridge_min_exponent: int = -8  # ridge candidates 10^-8 .. 10^8 (np.arange(-8, 9))
    ridge_max_exponent: int = 8
    ridge_fit_fraction: float = Field(0.8, gt=0, lt=1)  # the first int(n * 0.8) shuffled rows fit, the rest score
    # solve: one linear solve per candidate, as the official code does; eigh: one eigendecomposition of the fit rows' Gram
    # matrix scores every candidate (the same choice; slower on this project's CPU: docs/benchmarks/ranpac_solver.md)
    ridge_solver: Literal["solve", "eigh"] = "solve"


class BOFAConfig(_Section):
    """BOFA (AAAI 2026; methods/bofa.py). Defaults: C3Box exps/bofa.json (CIFAR-100 B50 Inc10, the one official config)
    and the constants of models/bofa.py, utils/inc_net.py `BofaAdapter` and backbone/linears.py `OLF`."""

    stage1_epochs: int = Field(15, ge=0)  # official `tuned_epoch`: epochs training the full task weight (and T_max)
    stage2_epochs: int = Field(2, ge=0)  # official `epoch` (get_attribute default 2): low-rank epochs after stage 1
    stage1_lr: float = Field(0.05, gt=0)  # official `init_lr`
    stage1_weight_decay: float = Field(0.05, ge=0)  # official `weight_decay`
    stage2_lr: float = Field(0.001, gt=0)  # BofaAdapter.get_param_group: the low-rank factor's lr
    stage2_weight_decay: float = Field(0.001, ge=0)  # and its weight decay
    bofa_min_lr: float = Field(0.0, ge=0)  # official `min_lr`: eta_min of the per-epoch cosine schedule
    bofa_momentum: float = Field(0.9, ge=0, lt=1)  # optim.SGD(..., momentum=0.9)
    bofa_batch_size: int = Field(128, ge=1)  # official `batch_size`
    Kt: int = Field(64, ge=1)  # rank of the stage-2 update: the Kt least-used directions of the old tasks' z
    stat: float = Field(0.1, ge=0, le=1)  # prediction: stat * GDA score + (1 - stat) * cosine to the hybrid prototypes
    center_type: Literal["mix", "img", "text"] = "mix"  # the prototypes: image/text mix, image only, text only
    lambda_grid: int = Field(21, ge=2)  # search_lambda_for_prompt: torch.linspace(0, 1, 21)
    covariance_ridge: float = Field(1e-4, ge=0)  # OLF.update_old_features: cov + 1e-4 * I


class EngineConfig(_Section):
    """ENGINE (Zhou et al., ICCV 2025; methods/engine.py). Defaults: the official exps/engine/cifar_0_10.json
    (github.com/LAMDA-CL/ICCV25-ENGINE); the packaged configs set each data set's values. Official names where they clash
    with no other section's leaf; `engine_*` for the training keys, `stat_weight` for the official `stat`."""

    text_des: float = Field(2.0, ge=0)  # weight of the description term
    image_aug: float = Field(0.5, ge=0)  # weight of the image-augmentation term (needs stored views unless 0)
    rerank: float = Field(0.5, ge=0, le=1)  # weight of the rerank logits against the adapter logits
    stat_weight: float = Field(0.8, ge=0, le=1)  # official `stat`: weight of the GDA logits
    sample_num: int = Field(0, ge=0)  # old classes replayed per batch (0: every old class, once)
    sample_noise: float = Field(0.25, ge=0)  # std of the noise added to a replayed class mean
    rerank_top: int = Field(5, ge=1)  # classes the rerank re-scores
    rerank_draws: int = Field(3, ge=1)  # Engine.rerank: `for _ in range(3)` random descriptions per pair, averaged
    engine_epochs: int = Field(10, ge=0)  # official `tuned_epoch` (and the cosine's T_max)
    engine_lr: float = Field(0.05, gt=0)  # official `init_lr`
    engine_min_lr: float = Field(0.0, ge=0)  # official `min_lr` (eta_min)
    engine_batch_size: int = Field(64, ge=1)  # official `batch_size`
    engine_weight_decay: float = Field(0.05, ge=0)  # official `weight_decay`
    engine_optimizer: Literal["sgd", "adam"] = "sgd"  # adam = AdamW, as in the official code
    engine_momentum: float = Field(0.9, ge=0, lt=1)  # optim.SGD(..., momentum=0.9)
    # which stored view an image's augmentation term compares it with: view (epoch mod V) in epoch `epoch` (with V >= the
    # epochs, every epoch sees a fresh noise draw of every image, as the official per-batch noise), or one drawn per batch
    view_schedule: Literal["per-epoch", "per-batch"] = "per-epoch"


class AreaConfig(_Section):
    """AREA (Xie, Shi, Zhou, ICML 2026; methods/area.py). Defaults: the official models/area.py `get_attribute` defaults
    (the packaged configs set each data set's exps/area/*.json); `area_*` for the training keys, `basis_rank` for the
    official `K`, `area_samples_per_class` for `samples_per_class`; the constants the official code writes inline are keys
    too (`consistency_views`: M = 3 in Learner.train; `routing_epsilon`: `_sinkhorn_distance`'s 0.1 (its 50 rounds are no
    knob: the value it returns does not depend on them, methods/area.py `sinkhorn_value`); `area_momentum`: optim.SGD's
    0.9)."""

    basis_rank: int = Field(16, ge=1)  # official `K`: directions per class of the visual and textual bases
    vib_lambda: float = Field(1.0, ge=0)  # weight of the occlusion + consistency losses
    g_lambda: float = Field(0.0, ge=0, le=1)  # weight of the GDA logits at test time (0 in every official config)
    area_samples_per_class: int = Field(4, ge=0)  # Gaussian pseudo-features of every old class in every batch
    consistency_views: int = Field(3, ge=1)  # M augmented views per batch
    routing_epsilon: float = Field(0.1, gt=0)  # the Sinkhorn value's epsilon (its 50 rounds do not change the value)
    area_epochs: int = Field(20, ge=0)  # official `epochs`
    area_lr: float = Field(0.001, gt=0)  # official `init_lr`
    area_milestones: list[int] = [7, 15]  # official `milestones` (MultiStepLR, per epoch)
    area_gamma: float = Field(0.1, gt=0)  # official `scheduler_gamma`
    area_batch_size: int = Field(128, ge=1)  # official `batch_size`
    area_weight_decay: float = Field(0.0001, ge=0)  # official `weight_decay`
    area_optimizer: Literal["sgd", "adam"] = "sgd"  # official `optimizer` (adam = AdamW, as in the official code)
    area_momentum: float = Field(0.9, ge=0, lt=1)


class Config(_Section):
    method: str = "spa"
    seed: int = Field(1993, ge=0, le=2**32 - 1)  # numpy.random.seed takes 0..2**32-1
    device: str = "auto"  # auto (CUDA when available), cpu, cuda, cuda:N; the resolved device is written to config.yaml
    data: DataConfig = DataConfig()
    spa: SPAConfig = SPAConfig()
    ablation: AblationConfig = AblationConfig()
    train: TrainConfig = TrainConfig()
    llm: LLMConfig = LLMConfig()
    rapf: RAPFConfig = RAPFConfig()
    proof: ProofConfig = ProofConfig()
    ranpac: RanPACConfig = RanPACConfig()
    bofa: BOFAConfig = BOFAConfig()
    engine: EngineConfig = EngineConfig()
    area: AreaConfig = AreaConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


_SECTIONS = ("data", "spa", "ablation", "train", "llm", "rapf", "proof", "ranpac", "bofa", "engine", "area")


def _leaf_paths() -> dict[str, list[str]]:
    """Map each leaf name to the dotted paths that end in it."""
    paths: dict[str, list[str]] = {}
    for name in Config.model_fields:
        if name in _SECTIONS:
            continue
        paths.setdefault(name, []).append(name)
    for section in _SECTIONS:
        cls = Config.model_fields[section].annotation
        for name in cls.model_fields:
            paths.setdefault(name, []).append(f"{section}.{name}")
    return paths


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        places = _leaf_paths().get(str(first["loc"][-1]), [])
        hint = f" (did you mean {' or '.join(places)}?)" if places and key not in places else ""
        return f"{source}: unknown config key '{key}'{hint}"
    value = first.get("input")
    return f"{source}: bad value {value!r} for '{key}': {first['msg']}"


def parse_override(item: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (dotted key, YAML-parsed value). Bare leaf names are resolved when unique."""
    if "=" not in item:
        raise InputError(f"--set {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    if "." not in key:
        candidates = _leaf_paths().get(key, [])
        if len(candidates) == 1:
            key = candidates[0]
        elif len(candidates) > 1:
            raise InputError(f"--set {key}: ambiguous key, use one of {', '.join(candidates)}")
        else:
            raise InputError(f"--set {key}: unknown config key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise InputError(f"--set {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def build_config(tree: Optional[dict] = None, overrides: tuple[str, ...] | list[str] = (), source: str = "config") -> Config:
    """Validate a config tree plus `KEY=VALUE` overrides into a Config (InputError on any bad key or value)."""
    tree = dict(tree or {})
    for section in _SECTIONS:
        if section in tree and tree[section] is not None and not isinstance(tree[section], dict):
            raise InputError(f"{source}: section '{section}' must be a mapping")
        tree[section] = dict(tree.get(section) or {})
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise InputError(_format_error(err, source)) from None


def read_yaml_mapping(path: str | Path, what: str, empty_ok: bool = False) -> dict:
    """A YAML mapping from `path` (yaml.safe_load: no Python objects); InputError naming the file when it cannot be read,
    is not YAML or is not a mapping. `what` says what the file should be ("config", "sweep file")."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except OSError as err:
        raise InputError(f"{path}: cannot read {what} ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if tree is None and empty_ok:
        return {}
    if not isinstance(tree, dict):
        raise InputError(f"{path}: a {what} must be a mapping")
    return tree


def load_config(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Read a YAML config (a path, or the name of a packaged benchmark config such as `cifar224_b0`). A run folder's
    config.yaml (beside its class_order.json) names its paths relative to the run folder (spacil.recorded_paths): they
    are resolved there, so that it runs again as it is from any directory; other configs' paths are the user's, relative
    to the working directory."""
    from spacil.recorded_paths import resolve_data_paths

    path = resolve_config_path(path)
    tree = read_yaml_mapping(path, "config", empty_ok=True)
    if path.name == "config.yaml" and (path.parent / "class_order.json").is_file():
        tree = resolve_data_paths(tree, path.parent)
    return build_config(tree, overrides, source=str(path))


def packaged_config_dir() -> Path:
    return Path(__file__).parent / "configs"


def resolve_packaged(name: str | Path, folder: Path, what: str) -> Path:
    """`name` as a file, else `folder/<name>.yaml` (a file shipped with spacil), else an InputError listing those."""
    candidate = Path(name)
    if candidate.is_file():
        return candidate
    packaged = folder / f"{name}.yaml"
    if packaged.is_file():
        return packaged
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    raise InputError(f"{name}: no such {what} file (packaged {what}s: {', '.join(known) or 'none'})")


def resolve_config_path(path: str | Path) -> Path:
    return resolve_packaged(path, packaged_config_dir(), "config")


# Settings that say where a run computes, not what it computes: a run may resume or be compared across them.
PLACEMENT_KEYS = ("device",)


def differing_keys(saved: dict, config: Config, ignore: tuple[str, ...] = PLACEMENT_KEYS,
                   folder: Optional[str | Path] = None) -> list[str]:
    """Dotted keys whose value in `saved` (a parsed config.yaml) differs from `config`, placement keys left out. With
    `folder` (where `saved` was read), paths are compared where they lead: `saved`'s recorded against `folder`,
    `config`'s against the working directory (spacil.recorded_paths)."""
    current = config.to_dict()
    if folder is not None:
        from spacil.recorded_paths import resolve_data_paths

        saved, current = resolve_data_paths(saved, folder), resolve_data_paths(current, None)
    # a key that `saved` lacks was added to spacil after that run was written; it ran as the key's default, which keeps
    # the older behaviour (e.g. spa.class_shortlist 0 is exact SPA), so an older run resumes and a sweep keeps its cells
    defaults = Config().to_dict()
    differ = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        mine, theirs = current.get(key), saved.get(key, defaults.get(key))
        if isinstance(mine, dict) and isinstance(theirs, dict):
            section = defaults.get(key) or {}
            differ += [f"{key}.{sub}" for sub in sorted(set(mine) | set(theirs))
                       if mine.get(sub) != theirs.get(sub, section.get(sub))]
        elif mine != theirs:
            differ.append(key)
    return differ


def config_notes(config: Config) -> list[str]:
    """What a resolved config accepts but does not use, one sentence each; `dump_config` writes them as comments at the top
    of config.yaml (comments: the file still parses and compares as the config alone)."""
    notes = []
    if config.spa.class_shortlist and not config.ablation.patch_branch:
        notes.append(f"spa.class_shortlist={config.spa.class_shortlist} is ignored: ablation.patch_branch=false scores "
                     f"no patches to shortlist")
    return notes


def dump_config(config: Config, folder: Optional[str | Path] = None, absolute: bool = False) -> str:
    """The config as YAML, its notes (`config_notes`) as leading comments; its data paths relative to `folder` (the file's
    folder: a run's config.yaml), or absolute."""
    from spacil.recorded_paths import record_data_paths, resolve_data_paths

    tree = config.to_dict()
    if folder is not None:
        tree = record_data_paths(tree, folder)
    elif absolute:
        tree = resolve_data_paths(tree, None)
    comments = "".join(f"# note: {note}\n" for note in config_notes(config))
    return comments + yaml.safe_dump(tree, sort_keys=False)
