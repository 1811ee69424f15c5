import json

import numpy as np
import pytest
import torch

from spacil.cli import main
from spacil.config import build_config
from spacil.learner import FeatureBatch, LearnerContext, TaskInfo
from spacil.methods.spa import SPA

VARIANTS = [
    [],
    ["relevance=mean"],
    ["patch_weights=relevance"],
    ["ot_grad=unroll", "ot_iters=10"],
    ["projector=mlp"],
    ["cov_type=diag"],
    ["pseudo_per_class=0"],
    ["patch_weight=0.5", "top_k_patches=3", "ot_epsilon=0.05"],
    ["optimizer=adamw", "schedule=constant", "lr=0.001"],
    ["ablation.patch_branch=false"],
    ["ablation.optimal_transport=false"],
    ["ablation.semantic_selection=false"],
    ["ablation.projectors=false"],
    ["ablation.gaussian_calibration=false"],
    ["ablation.llm_descriptions=false"],
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda v: ",".join(v) or "defaults")
def test_every_knob_and_ablation_runs(random_store, tmp_path, overrides):
    args = ["run", "--features", str(random_store), "--init-cls", "6", "--increment", "3", "--out", str(tmp_path / "run"),
            "--quiet", "--set", "epochs=2"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["curve"]) == 3 and all(0 <= a <= 100 for a in summary["curve"])
    config = (tmp_path / "run" / "config.yaml").read_text()
    for item in overrides:
        key, value = item.split("=")
        assert f"{key.split('.')[-1]}: {value}" in config


def test_spa_without_descriptions_says_what_to_do(random_store, tmp_path, capsys):
    (random_store / "text" / "descriptions.npy").unlink()
    (random_store / "text" / "description_mask.npy").unlink()
    assert main(["run", "--features", str(random_store), "--init-cls", "6", "--increment", "3", "--out", str(tmp_path / "r")]) == 2
    assert "llm_descriptions=false" in capsys.readouterr().err
    assert main(["run", "--features", str(random_store), "--init-cls", "6", "--increment", "3", "--out", str(tmp_path / "r2"),
                 "--set", "ablation.llm_descriptions=false", "--set", "epochs=1", "--quiet"]) == 0


def test_scoring_300_classes_196_patches_8_descriptions():
    """The protocol's largest shape (SUN: 300 classes) with ViT-B/16's 196 patches, d = 512: prediction works and matches
    a direct computation of SPEC.md's score for a few (image, class) pairs."""
    dim, classes, tokens, patches = 512, 300, 8, 196
    g = torch.Generator().manual_seed(0)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    config = build_config({"train": {"epochs": 0}})
    learner = SPA(config, LearnerContext(dim, patches, 100.0, torch.device("cpu")))
    mask = torch.ones(classes, tokens, dtype=torch.bool)
    mask[::7, 5:] = False
    learner.begin_task(TaskInfo(0, list(range(classes)), [f"c{i}" for i in range(classes)], unit(torch.randn(classes, dim, generator=g)),
                                unit(torch.randn(classes, tokens, dim, generator=g)) * mask[..., None], mask, None))
    with torch.no_grad():
        for stack in (learner.image_projector, learner.text_projector):
            stack.layers[0].weight.normal_(std=0.02, generator=g)
    batch = FeatureBatch(unit(torch.randn(4, dim, generator=g)), unit(torch.randn(4, patches, dim, generator=g)))
    logits = learner.logits(batch)
    assert logits.shape == (4, classes) and torch.isfinite(logits).all()
    # a direct, unbatched computation for two (image, class) pairs
    from spacil.ops.ot import sinkhorn_log

    phi, psi = learner.image_projector, learner.text_projector
    for image, cls in ((0, 0), (3, 14)):
        real = mask[cls]
        s = learner.semantic[cls][real]
        relevance = (batch.patches[image] @ s.T).amax(dim=1)
        top = relevance.topk(16).indices
        sim = phi(batch.patches[image][top]) @ psi(s).T
        plan = sinkhorn_log(1 - sim, torch.full((16,), -np.log(16)), torch.full((len(s),), -np.log(len(s))), 0.1, 100)
        expected = 100.0 * (phi(batch.global_[image]) @ psi(learner.prompts[cls]) + (plan * sim).sum())
        torch.testing.assert_close(logits[image, cls], expected, atol=1e-3, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Corrections of issue 18


def _learner_with_trained_projectors(overrides: dict, classes: int = 5, dim: int = 16, tokens: int = 3, patches: int = 9,
                                     empty_class: int = -1):
    """A learner after begin_task of one task, its projectors (weights and biases) away from zero, class `empty_class`
    without semantic tokens."""
    g = torch.Generator().manual_seed(3)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    config = build_config({"train": {"epochs": 0}, **overrides})
    learner = SPA(config, LearnerContext(dim, patches, 100.0, torch.device("cpu")))
    mask = torch.ones(classes, tokens, dtype=torch.bool)
    if empty_class >= 0:
        mask[empty_class] = False
    learner.begin_task(TaskInfo(0, list(range(classes)), [f"c{i}" for i in range(classes)],
                                unit(torch.randn(classes, dim, generator=g)),
                                unit(torch.randn(classes, tokens, dim, generator=g)) * mask[..., None], mask, None))
    with torch.no_grad():
        for stack in (learner.image_projector, learner.text_projector):
            stack.layers[0].weight.normal_(std=0.1, generator=g)
            stack.layers[0].bias.normal_(std=0.1, generator=g)
    batch = FeatureBatch(unit(torch.randn(4, dim, generator=g)), unit(torch.randn(4, patches, dim, generator=g)))
    return learner, batch


def test_a_class_without_descriptions_has_a_patch_score_of_exactly_zero():
    learner, batch = _learner_with_trained_projectors({}, empty_class=2)
    logits = learner.logits(batch)
    phi, psi = learner.image_projector, learner.text_projector
    global_only = 100.0 * phi(batch.global_) @ psi(learner.prompts).T  # [B, C]: z^g alone
    torch.testing.assert_close(logits[:, 2], global_only[:, 2], rtol=0, atol=1e-5)
    assert not torch.allclose(logits[:, [0, 1, 3, 4]], global_only[:, [0, 1, 3, 4]], atol=1e-2)  # the others do score
    # the zero placeholder token would score through the projector's bias: what the patch branch used to add
    assert psi(torch.zeros(1, 16)).abs().sum() > 0
    assert learner.semantic_present.tolist() == [True, True, False, True, True]


def test_random_patches_are_drawn_afresh_for_every_test_batch(monkeypatch):
    """The ablation's evaluation draws from one generator: batch 2 gets the next draws, not batch 1's patches again."""
    import spacil.methods.spa as spa_module
    from spacil.learner import task_generator
    from spacil.ops.patch_selection import random_patches

    learner, batch = _learner_with_trained_projectors({"ablation": {"semantic_selection": False}})
    drawn = []

    def recording(*args):
        drawn.append(random_patches(*args))
        return drawn[-1]

    monkeypatch.setattr(spa_module, "random_patches", recording)
    first, second = learner.logits(batch), learner.logits(batch)
    generator = task_generator(learner.config, 5, stream=5)
    expected = [random_patches(4, 5, 9, learner.knobs.top_k_patches, generator) for _ in range(2)]
    assert len(drawn) == 2 and all(torch.equal(a, b) for a, b in zip(drawn, expected))
    assert not torch.equal(drawn[0], drawn[1]) and not torch.allclose(first, second)
    # a new evaluation (after the next task's end_task, or a resume) starts the stream again
    learner._eval_generator = None
    torch.testing.assert_close(learner.logits(batch), first, rtol=0, atol=0)


def test_global_only_with_calibration_needs_no_patch_tokens(random_store, tmp_path):
    args = ["--init-cls", "6", "--increment", "3", "--quiet", "--set", "epochs=2", "--set", "ablation.patch_branch=false"]
    assert main(["run", "--features", str(random_store), "--out", str(tmp_path / "with"), *args]) == 0
    for split in ("train", "test"):
        (random_store / split / "patches.npy").unlink()
    assert main(["run", "--features", str(random_store), "--out", str(tmp_path / "without"), *args]) == 0
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("with", "without")]
    assert summaries[0]["curve"] == summaries[1]["curve"]
    assert "gaussian_calibration: true" in (tmp_path / "without" / "config.yaml").read_text()
