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
