"""SPA at scale (issue 23): the class shortlist, the per-batch pseudo-sample budget and chunked scoring."""

import dataclasses
import json

import pytest
import torch
import yaml

from conftest import assert_same_state, interrupt_at_task
from spacil.cli import main
from spacil.config import build_config, dump_config
from spacil.devices import MIN_WORKING_BYTES, working_memory
from spacil.learner import FeatureBatch, LearnerContext, TaskInfo, task_generator
from spacil.methods import spa as spa_module
from spacil.methods.spa import SPA

CLASSES, OLD, DIM, TOKENS, PATCHES = 7, 4, 16, 3, 9
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def _learner(overrides: dict, empty_class: int = -1, device: str = "cpu") -> tuple[SPA, FeatureBatch]:
    """A learner after begin_task of 7 classes, projectors away from zero, Gaussians of the first 4 classes stored (they
    are the old classes pseudo-samples come from), class `empty_class` without semantic tokens; and a batch of 5 images."""
    g = torch.Generator().manual_seed(5)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    config = build_config({"train": {"epochs": 0}, **overrides})
    device = torch.device(device)
    learner = SPA(config, LearnerContext(DIM, PATCHES, 100.0, device))
    mask = torch.ones(CLASSES, TOKENS, dtype=torch.bool)
    mask[1, 2:] = False
    if empty_class >= 0:
        mask[empty_class] = False
    learner.begin_task(TaskInfo(0, list(range(CLASSES)), [f"c{i}" for i in range(CLASSES)],
                                unit(torch.randn(CLASSES, DIM, generator=g)).to(device),
                                (unit(torch.randn(CLASSES, TOKENS, DIM, generator=g)) * mask[..., None]).to(device),
                                mask.to(device), None))
    with torch.no_grad():
        for stack in (learner.image_projector, learner.text_projector):
            for layer in stack.layers:  # none without projectors (the ablation)
                layer.weight.normal_(std=0.1, generator=g)
                layer.bias.normal_(std=0.05, generator=g)
    for position in range(OLD):
        for bank in (learner.global_bank, learner.patch_bank):
            bank.add(position, torch.randn(DIM, generator=g, dtype=torch.float64) * 0.3, torch.eye(DIM, dtype=torch.float64) * 0.02)
    batch = FeatureBatch(unit(torch.randn(5, DIM, generator=g)).to(device), unit(torch.randn(5, PATCHES, DIM, generator=g)).to(device),
                         torch.tensor([0, 4, 5, 6, 2], device=device))
    return learner, batch


def _twin(learner: SPA, overrides: dict) -> SPA:
    """A learner with the same state and other knobs."""
    tree = learner.config.to_dict()
    for key, value in overrides.items():
        section, name = key.split(".")
        tree[section][name] = value
    twin = SPA(build_config(tree), learner.context)
    twin.load_state_dict(learner.state_dict())
    for stack in (twin.image_projector, twin.text_projector):  # the current task's projectors train (loading froze them)
        stack.layers[-1].requires_grad_(True)
    return twin


def _gradients(learner: SPA, batch: FeatureBatch, budget=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss and the trainable parameters' gradients of one step (pseudo-samples from the task's generator)."""
    params = learner.image_projector.trainable() + learner.text_projector.trainable()
    for param in params:
        param.grad = None
    generator = task_generator(learner.config, 1, stream=2, device=learner.context.device)
    loss = learner.step_gradients(batch, batch.targets, generator, budget)
    return loss, [param.grad.clone() for param in params]


VARIANTS = [{}, {"spa.patch_weights": "relevance", "spa.pseudo_per_batch": 6},
            {"ablation.semantic_selection": False}, {"ablation.optimal_transport": False, "spa.relevance": "mean"},
            {"spa.ot_grad": "unroll", "spa.ot_iters": 7}]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "defaults")
def test_a_shortlist_of_every_class_is_exact_spa(overrides):
    """N >= the seen classes: the shortlist path (per-sample gathered tokens, scattered scores) gives exact SPA's logits and
    gradients, with pseudo-samples, a class with fewer tokens and one without any."""
    exact, batch = _learner({}, empty_class=3)
    exact = _twin(exact, overrides)
    listed = _twin(exact, {"spa.class_shortlist": CLASSES})
    for learner in (exact, listed):
        learner._eval_generator = None
    scores = listed.explain(batch)
    assert scores.shortlist.shape == (5, CLASSES)
    torch.testing.assert_close(listed.logits(batch), exact.logits(batch), rtol=1e-5, atol=1e-4)
    (loss, grads), (loss_listed, grads_listed) = _gradients(exact, batch), _gradients(listed, batch)
    torch.testing.assert_close(loss_listed, loss, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads)
    for a, b in zip(grads_listed, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_short_list_scores_patches_for_the_top_global_classes_only():
    learner, batch = _learner({"spa": {"class_shortlist": 2}})
    scores = learner.explain(batch)
    top = scores.global_.topk(2, dim=1).indices
    assert torch.equal(scores.shortlist.sort(dim=1).values, top.sort(dim=1).values)
    assert scores.plan.shape[:2] == (5, 2) and scores.relevance.shape == (5, 2, PATCHES)
    inside = torch.zeros(5, CLASSES, dtype=torch.bool).scatter(1, scores.shortlist, True)
    for b in range(5):
        smallest = scores.patch[b][inside[b]].min()
        # the stand-in: no class outside outranks one inside on the patch score; the prediction is a listed class
        assert torch.all(scores.patch[b][~inside[b]] == smallest)
        assert inside[b, scores.logits[b].argmax()]
        assert scores.slot(b, int(scores.shortlist[b, 1])) == 1 and scores.slot(b, int((~inside[b]).nonzero()[0])) is None
    # the listed classes' patch scores are exact SPA's
    exact = _twin(learner, {"spa.class_shortlist": 0}).explain(batch)
    torch.testing.assert_close(scores.patch[inside], exact.patch[inside], rtol=1e-5, atol=1e-5)
    # training always lists the label: here the label and the N highest other classes
    labels = scores.global_.argmin(dim=1)
    listed = learner._shortlist(scores.global_, labels)
    assert listed.shape == (5, 3) and all(labels[b] in listed[b] for b in range(5))


def _assert_same_sums(chunked: torch.Tensor, whole: torch.Tensor) -> None:
    """Two float32 gradients that are the same sum of per-sample terms added in another order: each element may differ by
    a few float32 roundings (eps 1.2e-7) of the terms' magnitude, which the tensor's largest element stands for (an element
    that cancels to almost 0 keeps the rounding of its large terms, so a tolerance relative to the element alone fails)."""
    scale = whole.abs().max().item()
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shortlist", [0, 3])
def test_chunked_scoring_gives_the_same_logits_and_gradients(shortlist, device, monkeypatch):
    """A budget of one byte: one sample and one class per chunk, each chunk's backward before the next."""
    learner, batch = _learner({"spa": {"class_shortlist": shortlist, "pseudo_per_batch": 5}}, device=device)
    loss, grads = _gradients(learner, batch)
    loss_chunked, grads_chunked = _gradients(learner, batch, budget=1)
    torch.testing.assert_close(loss_chunked, loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_chunked, grads):
        _assert_same_sums(a, b)
    whole = learner.logits(batch)
    tight = _twin(learner, {})
    monkeypatch.setattr(spa_module, "working_memory", lambda device, gib: 1)  # below the floor working_memory keeps
    torch.testing.assert_close(tight.logits(batch), whole, rtol=1e-5, atol=1e-5)
    assert tight._eval_budget == 1


def test_a_small_budget_splits_one_sample_over_classes(monkeypatch):
    """`_scores` splits the classes by the budget: chunks of as many classes as the bytes of B samples x c pairs allow."""
    for shortlist in (0, 6):
        learner, batch = _learner({"spa": {"class_shortlist": shortlist}})
        parts = []
        original = learner._patch_part
        monkeypatch.setattr(learner, "_patch_part", lambda *args: parts.append(args[4]) or original(*args))
        text = learner._text_features()
        pair = learner._pair_bytes(PATCHES, shortlist > 0)
        whole = learner._scores(batch.global_, batch.patches, text, labels=batch.targets).logits
        assert parts == [slice(0, CLASSES)]  # no budget: one chunk of every column
        parts.clear()
        chunked = learner._scores(batch.global_, batch.patches, text, labels=batch.targets, budget=5 * 2 * pair).logits
        width = CLASSES if shortlist == 0 else shortlist + 1
        assert parts == [slice(start, start + 2) for start in range(0, width, 2)]
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_the_working_memory_has_a_floor_and_the_budget_must_be_finite():
    """device_memory_budget 0 streams every row but does not make chunks of one (sample, class) pair."""
    assert working_memory(torch.device("cpu"), 0.0) == MIN_WORKING_BYTES
    assert working_memory(torch.device("cpu"), 2.0) == 2 << 30
    learner, batch = _learner({"train": {"epochs": 0, "device_memory_budget": 0}})
    calls = []
    original = learner._scores
    learner._scores = lambda *args, **kwargs: calls.append(len(args[0])) or original(*args, **kwargs)
    learner.logits(batch)
    assert learner._eval_budget == MIN_WORKING_BYTES and calls == [5]  # the tiny world's batch: one chunk


@pytest.mark.parametrize("device", DEVICES)
def test_pseudo_samples_per_batch_are_balanced_over_the_old_classes(device):
    learner, _ = _learner({"spa": {"pseudo_per_batch": 3}}, device=device)
    generator = task_generator(learner.config, 1, stream=2, device=learner.context.device)
    global_, patches, targets = learner._pseudo_batch(generator)
    assert global_.shape == (3, DIM) and patches.shape == (3, 16 if PATCHES >= 16 else learner.knobs.top_k_patches, DIM)
    assert len(set(targets.tolist())) == 3 and set(targets.tolist()) <= set(range(OLD))  # without replacement
    for per_batch in (1, 2, 3, 6, 10):  # fewer than the old classes, and whole passes plus a rest: never a class twice
        learner.knobs.pseudo_per_batch = per_batch
        for _ in range(30):
            counts = torch.bincount(learner._pseudo_batch(generator)[2], minlength=OLD)
            assert counts.sum() == per_batch and counts.max() - counts.min() <= 1
    # the run's seed decides the draws
    again = task_generator(learner.config, 1, stream=2, device=learner.context.device)
    learner.knobs.pseudo_per_batch = 3
    assert torch.equal(learner._pseudo_batch(again)[2], targets)
    learner.knobs.pseudo_per_batch = 0
    assert len(learner._pseudo_batch(again)[2]) == OLD * learner.knobs.pseudo_per_class


def test_bad_values_and_the_ignored_shortlist_note(random_store, tmp_path, capsys):
    base = ["run", "--features", str(random_store), "--init-cls", "6", "--increment", "3", "--quiet"]
    for knob in ("class_shortlist=-1", "pseudo_per_batch=-2", "device_memory_budget=-1", "device_memory_budget=inf",
                 "device_memory_budget=.nan", "class_shortlist=true", "pseudo_per_batch=2.5"):
        assert main(base + ["--out", str(tmp_path / "bad"), "--set", knob]) == 2
        err = capsys.readouterr().err
        assert knob.split("=")[0] in err and err.count("\n") == 1
    config = build_config({"spa": {"class_shortlist": 5}, "ablation": {"patch_branch": False}})
    text = dump_config(config)
    assert text.startswith("# note: spa.class_shortlist=5 is ignored")
    assert yaml.safe_load(text) == config.to_dict()
    assert "# note" not in dump_config(build_config({"spa": {"class_shortlist": 5}}))


def test_a_run_with_shortlist_and_pseudo_budget_resumes_as_an_uninterrupted_one(random_store, tmp_path, monkeypatch):
    args = ["--init-cls", "6", "--increment", "3", "--quiet", "--set", "epochs=2", "--set", "class_shortlist=2",
            "--set", "pseudo_per_batch=3"]
    assert main(["run", "--features", str(random_store), "--out", str(tmp_path / "whole"), *args]) == 0
    original = interrupt_at_task(monkeypatch, SPA, 2)
    assert main(["run", "--features", str(random_store), "--out", str(tmp_path / "cut"), *args]) == 130
    monkeypatch.setattr(SPA, "fit_task", original)
    assert main(["run", "--features", str(random_store), "--out", str(tmp_path / "cut"), "--resume", *args]) == 0
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
    whole, cut = (torch.load(tmp_path / name / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
                  for name in ("whole", "cut"))
    assert_same_state(cut, whole)
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert len(summary["curve"]) == 3


@pytest.mark.parametrize("shortlist", [0, 1])
def test_pseudo_samples_of_the_budget_stand_for_every_old_classs_share_of_the_loss(shortlist):
    """With P draws, each weighs (pseudo_per_class x old classes) / P: the loss's expectation is exact SPA's mean over the
    batch and pseudo_per_class draws of every old class. With a shortlist, pseudo-samples' labels are listed too (the
    expected logits force them in; the learner's must as well)."""
    learner, batch = _learner({"spa": {"pseudo_per_batch": 3, "pseudo_per_class": 4, "class_shortlist": shortlist}})
    drawn = learner._pseudo_batch(task_generator(learner.config, 1, stream=2))
    learner._pseudo_batch = lambda generator: drawn
    loss = learner.step_gradients(batch, batch.targets, task_generator(learner.config, 1, stream=2))
    text = learner._text_features()
    real = learner._scores(batch.global_, batch.patches, text, labels=batch.targets).logits
    pseudo = learner._scores(drawn[0], drawn[1], text, pseudo=True, labels=drawn[2]).logits
    ce = torch.nn.functional.cross_entropy
    expected = (ce(real, batch.targets, reduction="sum") + 4 * OLD / 3 * ce(pseudo, drawn[2], reduction="sum")) / (5 + 4 * OLD)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    if shortlist:  # the check bites: some drawn label is not among its sample's top global class
        unforced = learner._scores(drawn[0], drawn[1], text, pseudo=True).shortlist
        assert any(int(label) not in row for label, row in zip(drawn[2], unforced.tolist()))


@pytest.mark.parametrize("ablation", ["optimal_transport", "semantic_selection", "projectors", "gaussian_calibration",
                                      "llm_descriptions"])
def test_every_ablation_honours_the_shortlist_and_the_pseudo_budget(ablation):
    learner, batch = _learner({"spa": {"class_shortlist": 2, "pseudo_per_batch": 3}, "ablation": {ablation: False}})
    scores = learner.explain(batch)
    assert scores.shortlist.shape == (5, 2) and scores.plan.shape[:2] == (5, 2)
    inside = torch.zeros(5, CLASSES, dtype=torch.bool).scatter(1, scores.shortlist, True)
    assert inside[torch.arange(5), scores.logits.argmax(dim=1)].all()
    torch.testing.assert_close(learner.logits(batch), scores.logits)
    loss = learner.step_gradients(batch, batch.targets, task_generator(learner.config, 1, stream=2))
    assert torch.isfinite(loss)


def test_explain_draws_listed_classes_and_names_a_given_class_outside_the_shortlist():
    from types import SimpleNamespace

    from spacil.explain import explain_features

    learner, batch = _learner({"spa": {"class_shortlist": 2}})
    scores = learner.explain(batch)
    outside = [int((scores.shortlist[b, :, None] != torch.arange(CLASSES)).all(dim=0).nonzero()[0]) for b in range(5)]
    run = SimpleNamespace(learner=learner, names=[f"c{i}" for i in range(CLASSES)])
    records = explain_features(run, batch.global_, batch.patches, None, 3, outside)
    for b, record in enumerate(records):
        assert [e["role"] for e in record["explained"]] == ["predicted"]
        assert record["outside_shortlist"] == [f"c{outside[b]}"]
        slot = scores.slot(b, record["explained"][0]["column"])
        assert record["explained"][0]["picked"] == scores.indices[b, slot].tolist()
        assert "32 classes" not in record["shows"] and "2 classes of highest global score" in record["shows"]


def test_no_gradient_reaches_a_class_through_the_stand_in():
    """N < classes: the loss's gradients are those of exact SPA's patch scores inside each shortlist and, outside it, the
    smallest of them as a constant (no gradient through the copy)."""
    learner, batch = _learner({"spa": {"class_shortlist": 2, "pseudo_per_class": 0}})
    # a small logit scale: the classes outside the shortlist keep a share of the softmax, so a gradient through the
    # stand-in would be large enough to see (at 100 their share, so its gradient, is below float rounding)
    learner.context = dataclasses.replace(learner.context, logit_scale=1.0)
    _, grads = _gradients(learner, batch)
    exact = _twin(learner, {"spa.class_shortlist": 0})
    text = exact._text_features()
    columns = learner._scores(batch.global_, batch.patches, learner._text_features(), labels=batch.targets).shortlist
    scores = exact._scores(batch.global_, batch.patches, text)
    inside = torch.zeros_like(scores.patch, dtype=torch.bool).scatter(1, columns, True)
    stand_in = scores.patch.masked_fill(~inside, float("inf")).amin(dim=1, keepdim=True).detach()
    patch = torch.where(inside, scores.patch, stand_in)
    logits = exact.context.logit_scale * (scores.global_ + exact.knobs.patch_weight * patch)
    torch.nn.functional.cross_entropy(logits, batch.targets).backward()
    params = exact.image_projector.trainable() + exact.text_projector.trainable()
    assert len(params) == len(grads)
    for param, grad in zip(params, grads):
        _assert_same_sums(grad, param.grad)


def test_explain_says_the_class_for_a_shortlist_of_one():
    from spacil.explain import _shows
    assert _shows(_learner({"spa": {"class_shortlist": 1}})[0]).endswith("patches scored for the class of highest global score")
    assert "the 3 classes of highest" in _shows(_learner({"spa": {"class_shortlist": 3}})[0])
