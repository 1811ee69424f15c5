import pytest

from spacil.config import Config, build_config, load_config, packaged_config_dir
from spacil.data import DATASETS
from spacil.errors import InputError


def test_defaults_are_the_spec_defaults():
    c = Config()
    assert (c.spa.visual_samples, c.spa.sample_strategy, c.spa.num_descriptions, c.spa.semantic_tokens) == (6, "kmeans", 8, "sentence")
    assert (c.spa.relevance, c.spa.top_k_patches, c.spa.patch_weights) == ("max", 16, "uniform")
    assert (c.spa.ot_epsilon, c.spa.ot_iters, c.spa.ot_grad, c.spa.projector) == (0.1, 100, "detach", "linear")
    assert (c.spa.patch_weight, c.spa.cov_shrink, c.spa.cov_type, c.spa.pseudo_per_class) == (1.0, 1e-4, "full", 4)
    t = c.train
    assert (t.optimizer, t.momentum, t.lr, t.weight_decay, t.schedule, t.batch_size, t.epochs) == ("sgd", 0.9, 0.01, 0.05, "cosine", 64, 10)
    assert c.seed == 1993 and c.llm.model == "gpt-5" and c.data.model == "ViT-B-16" and c.data.pretrained == "laion400m_e32"
    assert all(c.ablation.model_dump().values())


def test_unknown_keys_and_bad_values_are_one_line_errors():
    with pytest.raises(InputError, match="unknown config key 'spa.top_k'"):
        build_config({"spa": {"top_k": 3}})
    with pytest.raises(InputError, match="unknown config key"):
        build_config({}, ["nonsense=1"])
    with pytest.raises(InputError, match="'spa.ot_epsilon'"):
        build_config({}, ["ot_epsilon=-1"])
    with pytest.raises(InputError, match="ambiguous"):
        build_config({}, ["model=x"])  # data.model and llm.model


def test_overrides_by_leaf_or_dotted_key():
    c = build_config({}, ["top_k_patches=4", "ablation.optimal_transport=false", "llm.model=gpt-x"])
    assert c.spa.top_k_patches == 4 and c.ablation.optimal_transport is False and c.llm.model == "gpt-x"


def test_eighteen_packaged_benchmark_configs():
    files = sorted(packaged_config_dir().glob("*.yaml"))
    benchmarks = [f for f in files if f.stem != "default"]
    assert len(benchmarks) == 20  # the nine's 18, and ImageNet-1k's two
    for key, spec in DATASETS.items():
        if key == "shapes":
            continue
        b0 = load_config(f"{key}_b0")
        half = load_config(f"{key}_b{spec.half_base}")
        assert (b0.data.dataset, b0.data.init_cls, b0.data.increment) == (key, spec.increment, spec.increment)
        assert (half.data.init_cls, half.data.increment) == (spec.half_base, spec.increment)


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(InputError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spa: {top_k_patches: many}\n")
    with pytest.raises(InputError, match="bad.yaml.*top_k_patches"):
        load_config(bad)


def test_a_knob_outside_its_section_names_where_it_belongs(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("top_k_patches: 8\n")
    with pytest.raises(InputError, match=r"unknown config key 'top_k_patches' \(did you mean spa.top_k_patches\?\)"):
        load_config(path)


def test_a_config_yaml_written_before_a_knob_existed_compares_as_that_knobs_default():
    """An older run's config.yaml lacks the knobs added since (here spa.class_shortlist and the whole area: section):
    it ran as their defaults, so a resume or a sweep's skip sees no difference, unless the new config changes them."""
    from spacil.config import differing_keys

    saved = build_config().to_dict()
    del saved["spa"]["class_shortlist"]
    del saved["area"]
    assert differing_keys(saved, build_config()) == []
    assert differing_keys(saved, build_config(overrides=["spa.class_shortlist=8"])) == ["spa.class_shortlist"]
    assert differing_keys(saved, build_config(overrides=["area.basis_rank=3"])) == ["area.basis_rank"]
