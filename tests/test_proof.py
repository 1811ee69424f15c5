"""PROOF, component by component against direct computations, then whole runs on a random store (with resume)."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import interrupt_at_task
from spacil.cli import main
from spacil.config import build_config, load_config
from spacil.learner import FeatureBatch, LearnerContext, TaskInfo
from spacil.methods import METHODS
from spacil.methods.proof import (CrossModalFusion, Proof, TaskProjections, clip_contrastive_loss, ensemble_logits, fuse,
                                  herding_selection)


def _direct_attention(fusion: CrossModalFusion, sequence: torch.Tensor) -> torch.Tensor:
    """One sequence [L, d], token by token: softmax over every token of q_i.k_j / sqrt(d), residual, LayerNorm."""
    d = sequence.shape[1]
    q, k, v = sequence @ fusion.query.T, sequence @ fusion.key.T, sequence @ fusion.value.T
    rows = []
    for i in range(len(sequence)):
        scores = torch.tensor([float(q[i] @ k[j]) / math.sqrt(d) for j in range(len(sequence))])
        weights = torch.exp(scores - scores.max())
        weights = weights / weights.sum()
        mixed = sum(weights[j] * v[j] for j in range(len(sequence)))
        x = mixed @ fusion.out_weight.T + fusion.out_bias + sequence[i]
        normed = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5)
        rows.append(normed * fusion.norm_weight + fusion.norm_bias)
    return torch.stack(rows)


def _fusion(dim=6, seed=0):
    fusion = CrossModalFusion(dim, 0.1, torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-trivial LayerNorm parameters, so the test sees them
        fusion.norm_weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed + 1))
        fusion.norm_bias.uniform_(-0.2, 0.2, generator=torch.Generator().manual_seed(seed + 2))
    return fusion


@torch.no_grad()
def test_fusion_is_attention_over_image_texts_prototypes_and_context():
    g = torch.Generator().manual_seed(3)
    fusion = _fusion()
    image, text, protos, context = (torch.randn(n, 6, generator=g) for n in (4, 3, 3, 2))
    fused_image, fused_text, fused_protos = fuse(fusion, image, text, protos, context, batch_mean=False)
    assert fused_image.shape == (4, 6) and fused_text.shape == (4, 3, 6) and fused_protos.shape == (4, 3, 6)
    for b in range(4):
        direct = _direct_attention(fusion, torch.cat([image[b:b + 1], text, protos, context]))  # [1 + 3 + 3 + 2, d]
        torch.testing.assert_close(fused_image[b], direct[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused_text[b], direct[1:4], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused_protos[b], direct[4:7], atol=1e-5, rtol=1e-5)
    # official: texts and prototypes are averaged over the batch
    mean_image, mean_text, mean_protos = fuse(fusion, image, text, protos, context, batch_mean=True)
    assert mean_text.shape == (3, 6) and mean_protos.shape == (3, 6)
    torch.testing.assert_close(mean_text, fused_text.mean(0))
    torch.testing.assert_close(mean_protos, fused_protos.mean(0))
    torch.testing.assert_close(mean_image, fused_image)
    # no mask: every token reaches the image token, the context prompts included; images never see each other
    moved = context.clone()
    moved[1] += 1.0
    assert not torch.allclose(fuse(fusion, image, text, protos, moved, False)[0], fused_image)
    other = image.clone()
    other[0] += 1.0
    again = fuse(fusion, other, text, protos, context, batch_mean=False)
    torch.testing.assert_close(again[0][1:], fused_image[1:])
    assert not torch.allclose(fuse(fusion, other, text, protos, context, batch_mean=True)[1], mean_text)


def test_fusion_dropout_is_drawn_from_the_generator():
    fusion = _fusion()
    image, shared = torch.randn(2, 6, generator=torch.Generator().manual_seed(0)), torch.randn(4, 6)
    a = fusion(image, shared, torch.Generator().manual_seed(9))
    b = fusion(image, shared, torch.Generator().manual_seed(9))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, fusion(image, shared))  # evaluation drops nothing


def test_projections_sum_over_tasks_and_train_only_the_newest_image_one():
    g = torch.Generator().manual_seed(0)
    projections = TaskProjections(4)
    for _ in range(3):
        projections.add_task(g, torch.device("cpu"))
    x = torch.randn(5, 4, generator=g)
    direct = sum(x @ w.T + b for w, b in zip(projections.weights, projections.biases))
    torch.testing.assert_close(projections(x), direct)
    assert all(w.abs().max() <= 0.5 for w in projections.weights)  # PyTorch's Linear init: +-1/sqrt(d)
    projections.set_trainable(last_only=True)
    assert [w.requires_grad for w in projections.weights] == [False, False, True]


def test_herding_hand_checked():
    # unit vectors v0=(1,0), v1=(0,1), v2=(.6,.8); mean (.533,.6). Step 1: v2 is nearest (0.21). Step 2: (v2+v0)/2 is
    # 0.33 from the mean, (v2+v1)/2 0.38 -> v0. Step 3: v1. Scaling a row changes nothing (rows are normalised).
    vectors = torch.tensor([[5.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    assert herding_selection(vectors, 3).tolist() == [2, 0, 1]
    assert herding_selection(vectors, 2).tolist() == [2, 0]
    assert herding_selection(vectors, 10).tolist() == [2, 0, 1]  # a class smaller than the memory keeps every row


def _herding_loop(vectors: np.ndarray, m: int) -> list[int]:
    """The official loop (np.delete on the chosen row), returning original row numbers."""
    vectors = (vectors.T / (np.linalg.norm(vectors.T, axis=0) + 1e-8)).T
    mean = vectors.mean(axis=0)
    rows, remaining, chosen = [], list(range(len(vectors))), []
    for k in range(1, m + 1):
        s = np.sum(chosen, axis=0) if chosen else 0
        i = int(np.argmin(np.sqrt(np.sum((mean - (vectors + s) / k) ** 2, axis=1))))
        rows.append(remaining.pop(i))
        chosen.append(vectors[i])
        vectors = np.delete(vectors, i, axis=0)
    return rows


def test_herding_matches_the_loop():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 7))
    assert herding_selection(torch.from_numpy(vectors), 15).tolist() == _herding_loop(vectors, 15)


def test_contrastive_loss_is_the_symmetric_clip_loss():
    g = torch.Generator().manual_seed(1)
    image, text = F.normalize(torch.randn(5, 8, generator=g), dim=-1), F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(20.0)
    per_image = [-torch.log_softmax(20 * torch.stack([image[i] @ text[j] for j in range(5)]), 0)[i] for i in range(5)]
    per_text = [-torch.log_softmax(20 * torch.stack([text[j] @ image[i] for i in range(5)]), 0)[j] for j in range(5)]
    expected = (sum(per_image) / 5 + sum(per_text) / 5) / 2
    torch.testing.assert_close(clip_contrastive_loss(image, text, scale), expected)


def _learner(**knobs):
    config = build_config({"method": "proof", "proof": {"tuned_epoch": 0, **knobs}})
    learner = Proof(config, LearnerContext(6, 1, 100.0, torch.device("cpu")))
    g = torch.Generator().manual_seed(5)
    for task in range(2):
        templates = F.normalize(torch.randn(3, 4, 6, generator=g), dim=-1)
        prompts = F.normalize(templates.mean(1), dim=-1)
        learner.begin_task(TaskInfo(task, [3 * task + i for i in range(3)], [f"c{i}" for i in range(3)], prompts, None, None,
                                    templates))
    with torch.no_grad():
        learner.prototypes.copy_(F.normalize(torch.randn(6, 6, generator=g), dim=-1))
    return learner, g


@torch.no_grad()
def test_prediction_is_the_three_way_ensemble_fused_per_chunk():
    learner, g = _learner(tuned_batch_size=2)
    batch = F.normalize(torch.randn(5, 6, generator=g), dim=-1)
    logits = learner.logits(FeatureBatch(batch, None))
    assert logits.shape == (5, 6)
    def project_text(t):
        return sum(t @ w.T + b for w, b in zip(learner.text_projections.weights, learner.text_projections.biases))

    def project_image(x):
        return sum(x @ w.T + b for w, b in zip(learner.image_projections.weights, learner.image_projections.biases))

    # per template: project, normalise; then average over templates and normalise (the official test-time text feature)
    text = F.normalize(F.normalize(project_text(learner.test_text), dim=-1).mean(1), dim=-1)
    protos = F.normalize(project_image(learner.prototypes), dim=-1)
    context = torch.cat(list(learner.context_prompts))
    assert context.shape == (2 * 3, 6)
    for start in (0, 2, 4):  # chunks of tuned_batch_size images are fused together (texts averaged over the chunk)
        image = project_image(batch[start:start + 2])  # official: unnormalised at prediction
        fused_image, fused_text, fused_protos = [], [], []
        for b in range(len(image)):
            out = _direct_attention(learner.fusion, torch.cat([image[b:b + 1], text, protos, context]))
            fused_image.append(out[0])
            fused_text.append(out[1:7])
            fused_protos.append(out[7:13])
        fused_image = torch.stack(fused_image)
        expected = (image @ text.T + fused_image @ torch.stack(fused_text).mean(0).T
                    + fused_image @ torch.stack(fused_protos).mean(0).T)
        torch.testing.assert_close(logits[start:start + 2], expected, atol=1e-4, rtol=1e-4)
    # the same sum through the public helper, for a per-image fusion
    fused = fuse(learner.fusion, image, text, protos, context, batch_mean=False)
    direct = image @ text.T + torch.einsum("bd,bcd->bc", fused[0], fused[1]) + torch.einsum("bd,bcd->bc", fused[0], fused[2])
    torch.testing.assert_close(ensemble_logits(image, text, *fused), direct)


RUN = ["--init-cls", "3", "--increment", "3", "--quiet", "--method", "proof", "--set", "proof.tuned_epoch=2",
       "--set", "proof.tuned_batch_size=8"]


def _run(store, out, *extra):
    return main(["run", "--features", str(store), "--out", str(out), *RUN, *extra])


def test_full_run_keeps_herded_exemplars_and_resumes_identically(random_store, tmp_path, monkeypatch):
    assert _run(random_store, tmp_path / "whole", "--set", "proof.memory_per_class=5") == 0
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert whole["label"] == "PROOF (5 exemplars/class)" and len(whole["curve"]) == 4
    state = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)["learner"]
    assert state["memory_features"].shape == (12 * 5, 16)
    assert torch.bincount(state["memory_targets"]).tolist() == [5] * 12
    assert state["image_projection_weights"].shape == (4, 16, 16) and len(state["context_prompts"]) == 4
    # the exemplars of each class are what herding picks from its stored training rows
    meta = json.loads((tmp_path / "whole" / "class_order.json").read_text())
    train_global = np.load(random_store / "train" / "global.npy").astype(np.float32)
    labels = np.load(random_store / "train" / "labels.npy")
    for position in (0, 7):
        rows = train_global[labels == meta["order"][position]]
        picked = herding_selection(torch.from_numpy(rows), 5)
        torch.testing.assert_close(state["memory_features"][state["memory_targets"] == position], torch.from_numpy(rows)[picked])

    original = interrupt_at_task(monkeypatch, Proof, 2)
    assert _run(random_store, tmp_path / "cut", "--set", "proof.memory_per_class=5") == 130
    monkeypatch.setattr(Proof, "fit_task", original)
    assert _run(random_store, tmp_path / "cut", "--set", "proof.memory_per_class=5", "--resume") == 0
    assert json.loads((tmp_path / "cut" / "summary.json").read_text()) == whole
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()


def test_shared_memory_shrinks_to_the_herding_prefix(random_store, tmp_path):
    """fixed_memory=false: memory_size // seen classes per class; old classes keep the first of their exemplars."""
    for name, knobs in (("shared", ["proof.fixed_memory=false", "proof.memory_size=24"]),
                        ("prompts", ["proof.text_features=prompts", "proof.fusion_batch_mean=false", "proof.tuned_optimizer=adam",
                                     "proof.normalize_eval_image=true", "proof.train_logit_scale=false",
                                     "proof.train_old_text_projections=false"])):
        args = [item for knob in knobs for item in ("--set", knob)]
        assert _run(random_store, tmp_path / name, *args) == 0
    summary = json.loads((tmp_path / "shared" / "summary.json").read_text())
    assert summary["label"] == "PROOF (24 exemplars in all)"
    state = torch.load(tmp_path / "shared" / "checkpoints" / "last.pt", weights_only=True)["learner"]
    assert torch.bincount(state["memory_targets"]).tolist() == [2] * 12  # 24 // 12
    meta = json.loads((tmp_path / "shared" / "class_order.json").read_text())
    labels = np.load(random_store / "train" / "labels.npy")
    rows = np.load(random_store / "train" / "global.npy").astype(np.float32)[labels == meta["order"][0]]
    torch.testing.assert_close(state["memory_features"][:2], torch.from_numpy(rows)[herding_selection(torch.from_numpy(rows), 8)[:2]])
    assert json.loads((tmp_path / "prompts" / "summary.json").read_text())["complete"]


def test_packaged_configs_carry_the_official_hyper_parameters():
    cifar = load_config("cifar224_b0", ["method=proof"]).proof
    assert (cifar.tuned_epoch, cifar.init_lr, cifar.tuned_batch_size, cifar.tuned_weight_decay, cifar.tuned_optimizer,
            cifar.min_lr, cifar.fixed_memory, cifar.memory_size) == (5, 0.001, 64, 0.05, "sgd", 0.0, False, 2000)
    aircraft = load_config("aircraft_b50").proof
    assert (aircraft.tuned_optimizer, aircraft.tuned_epoch, aircraft.fixed_memory) == ("adam", 10, False)
    food = load_config("food101_b50").proof
    assert (food.tuned_batch_size, food.init_lr, food.tuned_epoch) == (32, 0.002, 5)
    assert load_config("sun_b0").proof.memory_per_class == 20 and load_config("sun_b0").proof.fixed_memory
    assert "proof" in METHODS


def test_a_store_without_prompts_is_refused(random_store, tmp_path, capsys):
    (random_store / "text" / "prompts.npy").unlink()
    assert _run(random_store, tmp_path / "r") == 2
    assert "proof" in capsys.readouterr().err


@pytest.mark.parametrize("knob", ["proof.tuned_epoch=-1", "proof.tuned_optimizer=rmsprop", "proof.attention_dropout=1"])
def test_bad_knobs_exit_2(random_store, tmp_path, knob):
    assert _run(random_store, tmp_path / "r", "--set", knob) == 2


def _keep_every_checkpoint(monkeypatch) -> None:
    """Keep checkpoints/task_<t>.pt beside last.pt after each task t (1-based)."""
    from spacil.runner import Run

    real_checkpoint = Run._checkpoint

    def keep_every_checkpoint(self):
        real_checkpoint(self)
        shutil.copyfile(self.out / "checkpoints" / "last.pt", self.out / "checkpoints" / f"task_{len(self.evaluations)}.pt")

    monkeypatch.setattr(Run, "_checkpoint", keep_every_checkpoint)


def _task_states(folder, tasks=(1, 2)) -> list[dict]:
    return [torch.load(folder / "checkpoints" / f"task_{t}.pt", weights_only=True)["learner"] for t in tasks]


def test_a_later_task_trains_only_what_proof_trains(random_store, tmp_path, monkeypatch):
    """decay_frozen=false: after task 1, its image projection and context prompts stay as they were (frozen exactly); its
    text projection trains (official: every text projection does); the prototypes are the mean of the normalised training
    features."""
    _keep_every_checkpoint(monkeypatch)
    assert _run(random_store, tmp_path / "run", "--set", "proof.memory_per_class=5", "--set", "proof.decay_frozen=false") == 0
    first, second = _task_states(tmp_path / "run")
    torch.testing.assert_close(second["image_projection_weights"][0], first["image_projection_weights"][0], rtol=0, atol=0)
    torch.testing.assert_close(second["context_prompts"][0], first["context_prompts"][0], rtol=0, atol=0)
    assert not torch.equal(second["text_projection_weights"][0], first["text_projection_weights"][0])
    assert not torch.equal(second["image_projection_weights"][1], torch.zeros_like(second["image_projection_weights"][1]))
    order = json.loads((tmp_path / "run" / "class_order.json").read_text())["order"]
    train_global = torch.from_numpy(np.load(random_store / "train" / "global.npy").astype(np.float32))
    labels = np.load(random_store / "train" / "labels.npy")
    expected = torch.nn.functional.normalize(train_global[labels == order[0]], dim=-1).mean(dim=0)
    torch.testing.assert_close(first["prototypes"][0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_frozen_old_parameters_shrink_under_weight_decay_as_officially(random_store, tmp_path, monkeypatch, optimizer):
    """The default (decay_frozen=true): task 1's frozen image projection and context prompts are multiplied, at each step
    of task 2, by what the official optimizer does to a parameter with a zero gradient. SGD with momentum m:
    buf = m * buf + wd * p, p -= lr * buf; AdamW: p *= 1 - lr * wd. Computed here step by step from the schedule."""
    lr, decay, momentum = 0.05, 0.5, 0.9
    _keep_every_checkpoint(monkeypatch)
    assert _run(random_store, tmp_path / "run", "--set", "proof.memory_per_class=5", "--set", f"proof.init_lr={lr}",
                "--set", f"proof.tuned_weight_decay={decay}", "--set", f"proof.tuned_optimizer={optimizer}",
                "--set", f"proof.tuned_momentum={momentum}") == 0
    first, second = _task_states(tmp_path / "run")
    rows = 3 * 8 + len(first["memory_targets"])  # task 2: three classes of 8 training rows, and the exemplars
    epochs, steps = 2, math.ceil(rows / 8)  # RUN: tuned_epoch=2, tuned_batch_size=8
    scale, buffer = 1.0, 0.0  # p = scale * p_task1, elementwise
    for epoch in range(epochs):
        epoch_lr = lr * (1 + math.cos(math.pi * epoch / epochs)) / 2  # CosineAnnealingLR(T_max=epochs, eta_min=0)
        for _ in range(steps):
            if optimizer == "sgd":
                buffer = momentum * buffer + decay * scale
                scale -= epoch_lr * buffer
            else:
                scale *= 1 - epoch_lr * decay
    assert scale < 0.9
    for key in ("image_projection_weights", "image_projection_biases", "context_prompts"):
        torch.testing.assert_close(second[key][0], first[key][0] * scale, rtol=2e-5, atol=1e-7)
    assert not torch.equal(second["image_projection_weights"][1], torch.zeros_like(second["image_projection_weights"][1]))
