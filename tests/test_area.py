"""AREA (methods/area.py) against the official code's computations (github.com/LAMDA-CL/ICML2026-AREA, models/area.py and
utils/inc_net.py Area), written here from a reading of that code in plain torch, on small random inputs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_random_store
from spacil.cli import main
from spacil.errors import InputError
from spacil.methods import area as A

D, K = 12, 3


def _official_log_map(x, mu):  # models/area.py Learner.log_map, as written there
    cos_theta = torch.matmul(x, mu.reshape(-1))
    cos_theta = torch.clamp(cos_theta, -1.0 + 1e-6, 1.0 - 1e-6)
    theta = torch.acos(cos_theta)
    sin_theta = torch.sqrt(1 - cos_theta ** 2)
    coeff = theta / (sin_theta + 1e-6)
    mask_stable = theta > 1e-4
    scaling = torch.ones_like(coeff)
    scaling[mask_stable] = coeff[mask_stable]
    vec_diff = x - cos_theta.unsqueeze(1) * mu.unsqueeze(0)
    return scaling.unsqueeze(1) * vec_diff


def _official_basis(data, k):  # _get_visual_base_matrix's loop body
    mu_c = F.normalize(torch.mean(data, dim=0, keepdim=True), dim=-1)
    data = _official_log_map(data, mu_c).squeeze(0)
    _, _, vh = torch.linalg.svd(data.cpu(), full_matrices=False)
    return vh[:k, :].t()


def _official_forward(image_features, text_embeddings, visual_basis, textual_basis, visual_s, textual_s, visual_adapter,
                      textual_adapter, logit_scale):  # utils/inc_net.py Area.forward after encode_image
    image_features_residual = visual_adapter(image_features.detach())
    image_features_evidence = torch.einsum("cdk,bk->bcd", visual_basis, visual_s(image_features))
    image_features_residual = image_features_residual.unsqueeze(1).expand(-1, textual_basis.shape[0], -1)
    image_features = image_features_residual + image_features_evidence
    textual_features = textual_adapter(text_embeddings.detach()) + torch.einsum(
        "cdk,ck->cd", textual_basis, textual_s(text_embeddings.detach()))
    image_features = image_features / (image_features.norm(dim=-1, keepdim=True) + 1e-6)
    textual_features = textual_features / (textual_features.norm(dim=-1, keepdim=True) + 1e-6)
    return torch.einsum("bcd,cd->bc", image_features, textual_features) * logit_scale


def _official_sinkhorn(cost_matrix):  # models/area.py Learner._sinkhorn_distance (one image: B = 1)
    B, N_b = cost_matrix.shape
    mu = torch.ones(B, 1)
    nu = torch.ones(B, N_b) / N_b
    f = torch.zeros(B, 1)
    g = torch.zeros(B, N_b)
    log_K = -cost_matrix / 0.1
    for _ in range(50):
        term1 = g + log_K
        f = torch.log(mu) - torch.logsumexp(term1, dim=1, keepdim=True)
        g = torch.log(nu) - (f + log_K)
    return (f * mu).sum(dim=1) + (g * nu).sum(dim=1)


def _official_cost(query_emb, task_basis):  # models/area.py Learner._compute_cost_matrix
    return 1.0 - torch.matmul(F.normalize(query_emb, p=2, dim=1), F.normalize(task_basis, p=2, dim=1).T)


def _official_loss_cons(view_scores_list, text_scores_list):  # models/area.py Learner.train, `mean_scores` to `loss_cons`
    stacked_scores = torch.stack(view_scores_list)  # [M, B, K]
    mean_scores = stacked_scores.mean(dim=0)
    mean_text_scores = torch.stack(text_scores_list).mean(dim=0)
    loss_cons = torch.tensor(0.0)
    for m in range(len(view_scores_list)):
        loss_cons = loss_cons + F.l1_loss(view_scores_list[m], mean_scores)
        loss_cons = loss_cons + F.l1_loss(text_scores_list[m], mean_text_scores)
    return loss_cons


@pytest.fixture()
def world():
    g = torch.Generator().manual_seed(0)
    classes, batch = 5, 7
    return {
        "image": torch.randn(batch, D, generator=g) * 8,  # un-normalised, like encode_image's output
        "text": torch.randn(classes, D, generator=g) * 6,
        "visual_basis": torch.stack([_official_basis(torch.randn(9, D, generator=g) * 8, K) for _ in range(classes)]),
        "textual_basis": torch.stack([_official_basis(torch.randn(9, D, generator=g) * 6, K) for _ in range(classes)]),
        "visual_s": torch.nn.Linear(D, K, bias=False), "textual_s": torch.nn.Linear(D, K, bias=False),
        "visual_adapter": torch.nn.Linear(D, D, bias=False), "textual_adapter": torch.nn.Linear(D, D, bias=False),
    }


def test_bases_are_the_official_principal_geodesic_directions():
    g = torch.Generator().manual_seed(1)
    for scale in (1.0, 9.0):  # unit features, and encode_image's un-normalised ones (the official code's input)
        data = F.normalize(torch.randn(11, D, generator=g), dim=-1) * scale
        mu = F.normalize(data.mean(0, keepdim=True), dim=-1)
        assert torch.allclose(A.log_map(data, mu), _official_log_map(data, mu), atol=1e-6)
        assert torch.equal(A.geodesic_basis(data, K), _official_basis(data, K))
    few = A.geodesic_basis(torch.randn(2, D, generator=g), K)  # fewer features than K: zero columns
    assert few.shape == (D, K) and torch.all(few[:, 2] == 0)


def test_expert_logits_and_their_gradients_match_the_official_forward(world):
    w = world
    expected = _official_forward(w["image"], w["text"], w["visual_basis"], w["textual_basis"], w["visual_s"],
                                 w["textual_s"], w["visual_adapter"], w["textual_adapter"], 100.0)
    expected.sum().backward()
    grads = [p.grad.clone() for p in (w["visual_s"].weight, w["visual_adapter"].weight, w["textual_s"].weight)]
    params = [p.detach().clone().requires_grad_() for p in (w["visual_s"].weight, w["visual_adapter"].weight,
                                                            w["textual_s"].weight, w["textual_adapter"].weight)]
    text_unit = A.text_embeddings(w["text"], w["textual_basis"], params[2], params[3])
    got = A.expert_logits(w["image"], text_unit, w["visual_basis"], params[0], params[1], 100.0)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    got.sum().backward()
    for mine, theirs in zip(params[:3], grads):
        assert torch.allclose(mine.grad, theirs, atol=1e-3, rtol=1e-3)


def test_scores_losses_and_the_vib_weighted_term_match_the_official_train_step(world):
    w = world
    g = torch.Generator().manual_seed(2)
    occluded = w["image"] + torch.randn(w["image"].shape, generator=g)
    views = [w["image"] + torch.randn(w["image"].shape, generator=g) for _ in range(3)]
    occ_text, clean_text = torch.randn(1, D, generator=g), torch.randn(1, D, generator=g)
    aug_texts = [torch.randn(1, D, generator=g) for _ in range(3)]
    vs, ts = w["visual_s"], w["textual_s"]
    # models/area.py Learner.train, from `score_clean_gt` to `loss`
    score_clean_gt, score_occ_gt = vs(w["image"]), vs(occluded)
    loss_mask = torch.mean(torch.relu(score_occ_gt - score_clean_gt)) + torch.mean(torch.relu(ts(occ_text) - ts(clean_text)))
    view_scores_list = [vs(v) for v in views]
    text_scores_list = [ts(t) for t in aug_texts]
    loss_cons = _official_loss_cons(view_scores_list, text_scores_list)
    occlusion = A.occlusion_loss(occluded @ vs.weight.T, w["image"] @ vs.weight.T, occ_text @ ts.weight.T,
                                 clean_text @ ts.weight.T)
    consistency = A.consistency_loss([v @ vs.weight.T for v in views], [t @ ts.weight.T for t in aug_texts])
    assert torch.allclose(occlusion, loss_mask, atol=1e-6) and torch.allclose(consistency, loss_cons, atol=1e-6)
    assert torch.allclose(A.area_regulariser(0.7, occlusion, consistency), 0.7 * (loss_mask + loss_cons), atol=1e-6)


def test_routing_distances_and_task_choice_match_the_official_one_image_at_a_time(world):
    w = world
    bases = w["visual_basis"]
    bounds = [(0, 2), (2, 5)]
    chosen = A.route(w["image"], bases, bounds, 0.1)
    for b in range(len(w["image"])):
        dists = []
        for start, end in bounds:  # get_most_similar_task: 'C D K -> C K D -> (C K) D'
            rows = bases[start:end].permute(0, 2, 1).reshape(-1, D)
            cost = _official_cost(w["image"][b:b + 1], rows)
            dists.append(_official_sinkhorn(cost))
            assert torch.allclose(A.sinkhorn_distance(A.routing_cost(w["image"][b:b + 1], rows)), dists[-1], atol=1e-5)
            assert torch.allclose(A.sinkhorn_value(cost), dists[-1], atol=1e-4)  # the loop's value in closed form
        assert int(chosen[b]) == int(torch.argmax(torch.tensor(dists)))


def test_pseudo_features_are_the_official_gaussian_draws():
    g = torch.Generator().manual_seed(3)
    data = torch.randn(20, D, generator=g) * 5 + 2
    mean, cov = A.class_statistics(data)
    official_cov = torch.cov(data.t()) + 1e-4 * torch.eye(D)
    assert torch.allclose(mean, data.mean(0)) and torch.allclose(cov, official_cov)
    chol = torch.linalg.cholesky(cov)
    other_mean, other_chol = mean + 3, chol * 0.5
    drawn = A.sample_pseudo(torch.stack([mean, other_mean]), torch.stack([chol, other_chol]), 4,
                            torch.Generator().manual_seed(5))
    vec = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(5))  # Learner.sample: vec @ sqrt_cov.t() + mean
    assert torch.allclose(drawn[:4], vec[0] @ chol.t() + mean, atol=1e-5)
    assert torch.allclose(drawn[4:], vec[1] @ other_chol.t() + other_mean, atol=1e-5)


def test_final_logits_route_each_image_to_one_task_and_score_all_seen_classes(world):
    """Area.logits = forward_inference with the experts of the routed task (models/area.py _eval_cnn, g_lambda = 0)."""
    from spacil.config import build_config
    from spacil.learner import FeatureBatch, LearnerContext

    w = world
    width = 10
    proj = torch.randn(width, D, generator=torch.Generator().manual_seed(4))
    context = LearnerContext(D, 1, 100.0, torch.device("cpu"), False, width, proj)
    learner = A.Area(build_config({"method": "area", "area": {"basis_rank": K}}), context)
    learner.seen_positions = list(range(5))
    learner.bounds = [(0, 2), (2, 5)]
    learner.text, learner.visual_bases, learner.textual_bases = w["text"], w["visual_basis"], w["textual_basis"]
    g = torch.Generator().manual_seed(6)
    learner.visual_scorers = torch.randn(2, K, D, generator=g) * 0.3
    learner.textual_scorers = torch.randn(2, K, D, generator=g) * 0.3
    z = torch.randn(7, width, generator=g)
    got = learner.logits(FeatureBatch(z, None, extra={"global_pre": z}))
    image = z @ proj
    for b in range(7):
        task = int(A.route(image[b:b + 1], w["visual_basis"], learner.bounds, 0.1))
        lin = lambda weight: (lambda x: x @ weight.T)  # noqa: E731
        expected = _official_forward(image[b:b + 1], w["text"], w["visual_basis"], w["textual_basis"],
                                     lin(learner.visual_scorers[task]), lin(learner.textual_scorers[task]),
                                     lin(learner.visual_adapter), lin(learner.textual_adapter), 100.0)
        assert torch.allclose(got[b:b + 1], expected, atol=1e-3, rtol=1e-4)


def test_occlusion_view_follows_generate_occluded_inputs():
    from spacil.store.views import Occlusion, normalise_pixels

    images = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8)
    out = Occlusion()(images, np.arange(3), view=0, seed=0)
    clean = normalise_pixels(images.float() / 255)
    for i in range(3):
        changed = (out[i] != clean[i]).any(dim=0)
        rows, cols = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert 0.1 * 480 * 0.5 <= h * w <= 0.4 * 480 + 1  # int(rho H W) with rho in [0.1, 0.4], rounded down per side
        box = out[i][:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.min() >= 0 and box.max() < 1  # torch.rand noise on the normalised tensor
    assert torch.equal(out, Occlusion()(images, np.arange(3), view=0, seed=0))  # (seed, row, view) alone


def test_area_sets_import_and_missing_classes(tmp_path, capsys):
    root = tmp_path / "Toy"
    for sub, lines in (("generated_descriptions", 3), ("generated_descriptions_occ", 2), ("generated_descriptions_aug", 2)):
        (root / sub).mkdir(parents=True)
        for name in ("red apple", "F/A-18"):  # the release writes some folders' file names with spaces
            spaced = sub.endswith("_occ")
            file = root / sub / (name.replace(" ", " " if spaced else "_").replace("/", "_") + "_descriptions.txt")
            file.write_text("".join(f"img{i}.png\tA {name} seen from angle {i}.\n" for i in range(lines)))
    (root / "generated_descriptions" / "classnames.txt").write_text("red apple\nF/A-18\n")
    out = tmp_path / "sets.json"
    assert main(["descriptions", "import", "--format", "area-sets", str(root), "--out", str(out)]) == 0
    sets = json.loads(out.read_text())["sets"]
    assert sets["clean"]["red apple"][0] == "img0.png\tA red apple seen from angle 0."  # the line as the official code reads it
    assert len(sets["occluded"]["F/A-18"]) == 2
    (root / "generated_descriptions_aug" / "F_A-18_descriptions.txt").unlink()
    capsys.readouterr()
    assert main(["descriptions", "import", "--format", "area-sets", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "F/A-18" in err and "generated_descriptions_aug" in err and err.count("\n") == 1


def test_published_clean_set_reads_as_the_official_code_reads_it(reference, tmp_path):
    """The published clean set of CUB (its one folder, linked as all three sets): every class of its class_names.txt under
    spacil's CUB name (`001.Black_footed_Albatross` -> `Black footed Albatross`), every line whole."""
    from spacil.store.area_texts import import_area_folders

    folder = reference / "area_descriptions" / "CUB"
    if not folder.is_dir():
        pytest.skip("no CUB folder in the reference copy")
    for sub in ("generated_descriptions", "generated_descriptions_occ", "generated_descriptions_aug"):
        (tmp_path / sub).symlink_to(folder, target_is_directory=True)
    imported = import_area_folders(tmp_path)
    files = sorted(folder.glob("*_descriptions.txt"))
    assert len(imported["sets"]["clean"]) == len(files) == 200
    first = [line.strip() for line in files[0].read_text(encoding="utf-8").splitlines() if line.strip()]
    assert files[0].name == "001.Black_footed_Albatross_descriptions.txt"
    assert imported["sets"]["occluded"]["Black footed Albatross"] == first and all("\t" in line for line in first)
    assert not [name for name in imported["sets"]["clean"] if name[:1].isdigit()]


def test_a_store_without_area_inputs_is_refused_before_the_run_folder(tmp_path, capsys):
    store = make_random_store(tmp_path / "plain", width=16)
    out = tmp_path / "run"
    assert main(["run", "--features", str(store), "--out", str(out), "--method", "area", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--view-transform occlusion" in err and err.count("\n") == 1 and not out.exists()
    rich = make_random_store(tmp_path / "rich", width=16, area=3)
    meta = json.loads((rich / "meta.json").read_text())
    del meta["area_texts"]
    (rich / "meta.json").write_text(json.dumps(meta))
    assert main(["run", "--features", str(rich), "--out", str(out), "--method", "area", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--area-descriptions" in err and err.count("\n") == 1 and not out.exists()


def test_area_description_sets_encoded_into_a_store_with_missing_classes_refused(tmp_path, capsys):
    from spacil.store.area_texts import AREA_SETS, area_text_files, encode_sets, prompt_sets, read_area_sets, write_area_texts
    from spacil.store.format import FeatureStore

    store = make_random_store(tmp_path / "store", num_classes=3, dim=8, width=8)
    names = json.loads((store / "meta.json").read_text())["classes"]
    file = tmp_path / "sets.json"
    sets = {name: {n: [f"{name} {n} {i}" for i in range(2 + j)] for j, n in enumerate(names)}
            for name in ("clean", "occluded", "augmented")}
    file.write_text(json.dumps({"format": "spacil-area-descriptions", "version": 1, "sets": sets}))
    seen = []

    def encode(texts):
        seen.extend(texts)
        return np.ones((len(texts), 8), np.float32) / np.sqrt(8), np.full(len(texts), 3.0, np.float32)

    write_area_texts(store, encode_sets(encode, {**read_area_sets(file, names), **prompt_sets(names)}, 8), str(file))
    assert "a good photo of a class 0." in seen and "a photo of a class 2." in seen
    opened = FeatureStore(store).area_texts
    raw, counts = opened.rows("clean", [2, 0])
    assert counts.tolist() == [4, 2] and np.allclose(np.linalg.norm(raw[0, :4], axis=-1), 3.0)
    assert {Path(rel).name for rel in area_text_files("clean")} <= {p.name for p in (store / "text").iterdir()}
    del sets["occluded"][names[1]]
    file.write_text(json.dumps({"format": "spacil-area-descriptions", "version": 1, "sets": sets}))
    with pytest.raises(InputError, match="'occluded' set has no sentences for class 'class 1'"):
        read_area_sets(file, names)
    assert len(AREA_SETS) == 5


def test_describe_area_sets_with_areas_prompt_resumes_and_encodes_into_a_store(shapes_root, tiny_model, tmp_path,
                                                                               monkeypatch, capsys):
    """`spacil describe --area-sets` against the local OpenAI-compatible server: AREA's prompt, one caption per image and
    set, `<image>\\t<caption>` lines; a rerun asks nothing; `spacil extract --area-descriptions` encodes it; a store of
    that file runs AREA (with its two view sets added by `spacil extract --views 1 --view-transform ...`)."""
    from llm_server import LLMServer

    monkeypatch.setenv("SPACIL_TEST_KEY", "k")
    out = tmp_path / "area_sets.json"
    args = ["describe", "--dataset", "shapes", "--data-root", str(shapes_root), "--out", str(out), "--area-sets",
            "--images-per-class", "2", "--api-key-env", "SPACIL_TEST_KEY", "--quiet"]
    with LLMServer(count=2) as server:
        assert main([*args, "--base-url", server.base_url]) == 0
        asked = len(server.requests)
        assert main([*args, "--base-url", server.base_url]) == 0
        assert len(server.requests) == asked
    data = json.loads(out.read_text())
    classes = data["sets"]["clean"]
    assert asked == 3 * 2 * len(classes) and set(data["sets"]) == {"clean", "occluded", "augmented"}
    line = next(iter(classes.values()))[0]
    assert "\t" in line and "\n" not in line and "detail number one" in line
    store = tmp_path / "store"
    extract = ["extract", "--dataset", "shapes", "--data-root", str(shapes_root), "--out", str(store), "--model",
               tiny_model, "--pretrained", "", "--device", "cpu", "--quiet"]
    assert main([*extract, "--area-descriptions", str(out), "--views", "1", "--view-transform", "occlusion"]) == 0
    assert main([*extract, "--area-descriptions", str(out), "--views", "1", "--view-transform", "area-augment"]) == 0
    meta = json.loads((store / "meta.json").read_text())
    other = tmp_path / "other_sets.json"  # a copy is the same sets; another file's sets are refused, nothing re-encoded
    other.write_text(out.read_text())
    assert main([*extract, "--area-descriptions", str(other)]) == 0
    other.write_text(out.read_text().replace("detail number one", "detail number three"))
    capsys.readouterr()
    assert main([*extract, "--area-descriptions", str(other)]) == 2
    err = capsys.readouterr().err
    assert "another file" in err and str(other) in err and err.count("\n") == 1
    out.write_text(out.read_text().replace("detail number one", "detail number two"))  # the same file, edited since
    assert main([*extract, "--area-descriptions", str(out)]) == 2
    assert "earlier contents" in capsys.readouterr().err
    assert json.loads((store / "meta.json").read_text()) == meta
    assert meta["views"]["transform"] == "occlusion" and set(meta["view_sets"]) == {"area-augment"}
    assert meta["area_texts"]["source"] == str(out)
    run = ["run", "--features", str(store), "--out", str(tmp_path / "run"), "--method", "area", "--init-cls", "2",
           "--increment", "2", "--set", "area_epochs=1", "--set", "basis_rank=2", "--quiet"]
    assert main(run) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["complete"]


def test_spacil_check_knows_areas_arrays(tmp_path):
    """`spacil check` reads AREA's view sets and description sets like every other array: a sound store passes, a NaN in
    one of them is named."""
    from spacil.store.check import check_store

    store = make_random_store(tmp_path / "store", width=24, area=3)
    assert check_store(store) == []
    views = np.load(store / "train" / "views_occlusion_global.npy")
    views[2, 1, 0] = np.nan
    np.save(store / "train" / "views_occlusion_global.npy", views)
    texts = np.load(store / "text" / "area_augmented.npy")
    texts[1, 0, 3] = np.inf
    np.save(store / "text" / "area_augmented.npy", texts)
    findings = check_store(store)
    assert len(findings) == 2 and "views_occlusion_global.npy" in findings[0] and "area_augmented.npy" in findings[1]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_area_runs_on_the_device_and_reproduces_the_cpu(tmp_path, device):
    """The same AREA run on `device` and on the CPU: the same curve within float tolerance (every draw is a CPU
    generator's; the rows move to the device once)."""
    store = make_random_store(tmp_path / "store", width=24, area=3)
    runs = {}
    for name, where in (("reference", "cpu"), ("device", device)):
        out = tmp_path / name
        assert main(["run", "--features", str(store), "--out", str(out), "--method", "area", "--device", where,
                     "--init-cls", "3", "--increment", "3", "--set", "area_epochs=2", "--set", "area_batch_size=8",
                     "--set", "basis_rank=2", "--quiet"]) == 0
        runs[name] = json.loads((out / "summary.json").read_text())["curve"]
    assert np.allclose(runs["reference"], runs["device"], atol=3.0)  # a flipped near-tie moves a 4-image class by 25 points / 48


def _tiny_learner_after_one_task():
    """A 2-task AREA learner (3 classes per task, 6 images per class) that trained task 1 for an epoch and has begun
    task 2: (learner, config, proj, z of both tasks [2, 18, width], the texts {set: (raw [6, M, D], counts [6])})."""
    from spacil.config import build_config
    from spacil.learner import LearnerContext, TaskData, TaskInfo

    width, per_class = 10, 6
    g = torch.Generator().manual_seed(11)
    proj = torch.randn(width, D, generator=g)
    config = build_config({"method": "area", "area": {"basis_rank": K, "vib_lambda": 0.37, "area_samples_per_class": 2,
                                                      "area_epochs": 1, "area_batch_size": 8, "area_lr": 0.05}})
    learner = A.Area(config, LearnerContext(D, 1, 10.0, torch.device("cpu"), False, width, proj))
    counts = {"clean": [5, 4, 6, 5, 4, 6], "occluded": [2, 3, 4, 3, 2, 4], "augmented": [3, 2, 4, 4, 3, 2],
              "name_prompt": [1] * 6, "photo_prompt": [1] * 6}
    texts = {name: (torch.randn(6, max(c), D, generator=g) * 4, torch.tensor(c)) for name, c in counts.items()}
    z = torch.randn(2, 3 * per_class, width, generator=g) + torch.randn(2, 3, 1, width, generator=g).repeat_interleave(
        per_class, dim=1)[:, :, 0] * 2
    for task in range(2):
        positions = [3 * task + c for c in range(3)]
        learner.begin_task(TaskInfo(task, positions, [f"c{p}" for p in positions], None, None, None, None,
                                    area_texts={n: (raw[positions], c[positions]) for n, (raw, c) in texts.items()}))
        if task == 1:
            return learner, config, proj, z, texts
        views = {name: (z[task][:, None] + torch.randn(3 * per_class, 2, width, generator=g) * 0.3).numpy()
                 for name in ("views_occlusion_pre", "views_area_augment_pre")}
        data = TaskData(task, z[task].numpy(), None, np.repeat(positions, per_class), torch.device("cpu"),
                        extra={"global_pre": z[task].numpy(), **views})
        learner.fit_task(data)
        learner.end_task(data)


def test_a_new_tasks_scorers_start_as_copies_of_the_last():
    """utils/inc_net.py Area.append_S: after the first task, the new task's scorers are the last task's (trained) ones."""
    learner, *_ = _tiny_learner_after_one_task()
    assert learner.visual_scorers.shape[0] == 2
    assert torch.equal(learner.visual_scorers[1], learner.visual_scorers[0])
    assert torch.equal(learner.textual_scorers[1], learner.textual_scorers[0])
    fresh = A.initial_linear(K, D, A.task_generator(learner.config, 0, stream=A._STREAM_INIT))
    assert not torch.allclose(learner.visual_scorers[0], fresh)  # trained: no fresh initialisation can equal it


def test_one_batch_loss_and_gradients_are_the_official_train_steps():
    """One batch of task 2 (old classes present): models/area.py Learner.train's `loss`, written here in plain torch from
    the official code, with the same draws (the pseudo-features' noise, the sentences) taken from fresh copies of the
    learner's generators, against Area._loss: value and the gradients of the four trained weights. The bases, text
    features and class statistics are computed here as the official code does, from the raw features."""
    from spacil.learner import TaskData

    learner, config, proj, z, texts = _tiny_learner_after_one_task()
    f = z @ proj  # encode_image's output of every training image [2, 18, D]
    labels_all = torch.arange(6).repeat_interleave(6)
    data = TaskData(1, z[1].numpy(), None, np.repeat([3, 4, 5], 6), torch.device("cpu"),
                    extra={"global_pre": z[1].numpy(), "views_occlusion_pre": z[1][:, None].numpy(),
                           "views_area_augment_pre": z[1][:, None].numpy()})
    learner.knobs = config.area.model_copy(update={"area_epochs": 0})  # the new classes' visual bases, no training
    learner.fit_task(data)
    learner.knobs = config.area
    g = torch.Generator().manual_seed(12)
    rows = torch.tensor([7, 0, 12, 3, 16])  # classes 4, 3, 5, 3, 5: the first image's class is neither first nor last
    image, labels = f[1][rows], labels_all[18:][rows]
    occluded = image + torch.randn(image.shape, generator=g)
    augmented = [image + torch.randn(image.shape, generator=g) for _ in range(3)]
    start = [learner.visual_adapter, learner.textual_adapter, learner.visual_scorers[-1], learner.textual_scorers[-1]]
    mine = [torch.nn.Parameter(t.clone()) for t in start]
    streams = (A._STREAM_PSEUDO, A._STREAM_SENTENCES)
    got = learner._loss(image, labels, occluded, augmented, 3,
                        {s: A.task_generator(config, 1, stream=s) for s in streams}, *mine)
    got.backward()

    # --- the official computation (models/area.py Learner.train, one batch of task 2, in plain torch) ---
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    visual_adapter, textual_adapter, visual_s, textual_s = [(lambda w: (lambda x: x @ w.T))(p) for p in theirs]
    gens = {s: A.task_generator(config, 1, stream=s) for s in streams}
    flat = f.reshape(-1, D)
    visual_basis = torch.stack([_official_basis(flat[labels_all == c], K) for c in range(6)])
    textual_basis = torch.stack([_official_basis(raw[:int(n)], K) for raw, n in zip(*texts["clean"])])
    text_features = texts["name_prompt"][0][:, 0]  # "a good photo of a <class>."
    # _update_stat / analyze_mean_cov of task 1, then Learner.sample per old class (here in class order; its noise drawn
    # as one [old, size, D] block, the learner's draw)
    noise = torch.randn(3, 2, D, generator=gens[A._STREAM_PSEUDO])
    sg_inputs, sg_targets = [], []
    for i in range(3):
        class_data = flat[labels_all == i]
        cov = torch.cov(class_data.t()) + 1e-4 * torch.eye(D)
        sg_inputs.append(noise[i] @ torch.linalg.cholesky(cov).t() + class_data.mean(dim=0))
        sg_targets.append(torch.ones(2, dtype=torch.long) * i)
    targets = torch.cat([labels, *sg_targets])
    outputs = _official_forward(torch.cat([image, *sg_inputs]), text_features, visual_basis, textual_basis, visual_s,
                                textual_s, visual_adapter, textual_adapter, 10.0)
    loss_c = F.cross_entropy(outputs, targets)
    score_clean_gt, score_occ_gt = visual_s(image), visual_s(occluded)
    local = int(labels[0]) - 3  # real_targets[0]'s class, its files

    def choice(name):  # random.choice(lines) of the class's file
        raw, n = texts[name]
        return raw[3 + local, int(torch.randint(int(n[3 + local]), (1,), generator=gens[A._STREAM_SENTENCES]))][None]

    occ_score = textual_s(choice("occluded"))
    clean_score = textual_s(texts["photo_prompt"][0][3 + local, 0][None])  # "a photo of a <class>."
    loss_mask = torch.mean(torch.relu(score_occ_gt - score_clean_gt)) + torch.mean(torch.relu(occ_score - clean_score))
    view_scores_list, text_scores_list = [], []
    for m in range(3):
        text_scores_list.append(textual_s(choice("augmented")))
        view_scores_list.append(visual_s(augmented[m]))
    loss_cons = _official_loss_cons(view_scores_list, text_scores_list)
    expected = loss_c + 0.37 * (loss_mask + loss_cons)
    expected.backward()
    assert loss_mask.item() > 1e-2 and loss_cons.item() > 1e-2  # the regulariser counts here
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (float(got), float(expected))
    for name, a, b in zip(("visual_adapter", "textual_adapter", "visual_S", "textual_S"), mine, theirs):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5), name


def _official_geometry(H, W, draws, rho=(0.1, 0.4), eta=(0.33, 3.0)):
    """models/area.py _generate_occluded_inputs's box for one image, with np.random.uniform / randint replaced by the
    uniform draws [4] (rho, eta, u, v): -> (u, v, h, w), u the row and h the height."""
    area = int((rho[0] + (rho[1] - rho[0]) * draws[0]) * H * W)
    e = eta[0] + (eta[1] - eta[0]) * draws[1]
    h = int(np.clip(int(np.sqrt(area * e)), 1, H))
    w = int(np.clip(int(np.sqrt(area / e)), 1, W))
    u = int(draws[2] * (H - h + 1)) if H - h > 0 else 0
    v = int(draws[3] * (W - w + 1)) if W - w > 0 else 0
    return u, v, h, w


def test_occlusion_views_are_the_official_boxes_drawn_by_hand():
    """Every view: the normalised image with the official box (height from sqrt(area * eta) on the rows, width from
    sqrt(area / eta) on the columns) replaced by torch.rand noise [C, h, w], all drawn from the view's generator."""
    from spacil.store.views import Occlusion, _row_seed, normalise_pixels

    images = torch.randint(0, 256, (4, 3, 18, 30), dtype=torch.uint8)
    rows = np.array([0, 5, 9, 2])
    out = Occlusion()(images, rows, view=1, seed=3)
    clean = normalise_pixels(images.float() / 255)
    shapes = set()
    for i, row in enumerate(rows):
        g = torch.Generator().manual_seed(_row_seed(3, int(row), 1))
        u, v, h, w = _official_geometry(18, 30, torch.rand(4, generator=g, dtype=torch.float64).tolist())
        expected = clean[i].clone()
        expected[:, u:u + h, v:v + w] = torch.rand((3, h, w), generator=g)
        assert torch.equal(out[i], expected), i
        shapes.add((h, w))
    assert any(h != w for h, w in shapes)  # a swap of h and w would show


def test_area_augment_normalises_then_flips_and_jitters_by_hand():
    """AreaAugment as models/area.py Learner.train applies its augmentation_transform: to the *normalised* tensor, a flip
    with probability 1/2, then ColorJitter's float ops (brightness, contrast, saturation blends clamped to [0, 1], then
    hue), here in the fixed order with the view's five uniform draws."""
    from torchvision.transforms import functional as TF

    from spacil.store.views import AreaAugment, _row_seed, normalise_pixels

    images = torch.randint(0, 256, (3, 3, 16, 20), dtype=torch.uint8)
    rows = np.array([4, 1, 7])
    out = AreaAugment()(images, rows, view=0, seed=2)
    flips = set()
    for i, row in enumerate(rows):
        d = torch.rand(5, generator=torch.Generator().manual_seed(_row_seed(2, int(row), 0))).tolist()
        x = normalise_pixels(images[i].float() / 255)
        flips.add(d[0] < 0.5)
        x = x.flip(-1) if d[0] < 0.5 else x
        gray = lambda t: (0.2989 * t[0] + 0.587 * t[1] + 0.114 * t[2]).unsqueeze(0)  # noqa: E731 rgb_to_grayscale
        blend = lambda a, b, r: (r * a + (1 - r) * b).clamp(0, 1)  # noqa: E731 torchvision's _blend
        x = blend(x, torch.zeros_like(x), 1 + 0.2 * (2 * d[1] - 1))
        x = blend(x, gray(x).mean(), 1 + 0.2 * (2 * d[2] - 1))
        x = blend(x, gray(x), 1 + 0.2 * (2 * d[3] - 1))
        x = TF.adjust_hue(x, 0.1 * (2 * d[4] - 1))
        assert torch.allclose(out[i], x, atol=1e-5), i
    assert flips == {True, False}  # both branches seen


def test_areas_prompt_is_the_official_text_blank_lines_included():
    """descriptions/generate_descriptions.py's prompt, as written there (its two blank lines and the space after
    'Focus on:')."""
    from spacil.describe.area_sets import area_prompt

    official = ('\nYou are an expert in fine-grained visual classification.\nI will show you a low-resolution photo of a '
                '"red apple".\n\nPlease provide a **single, concise, and detailed sentence** describing the visual '
                'appearance of this specific **red apple** (or object) in the image.\nFocus on: \n- The specific color '
                'and texture.\n- The viewpoint or pose.\n- Any distinct background environment.\n- Distinguishing '
                'features visible despite the low resolution.\n\nConstraint: Output ONLY the description sentence. Do '
                'not add "Here is the description" or quotes.\n')
    assert area_prompt("red_apple") == official


def _release_folder(root, classes, lines, files=None, listing="classnames.txt"):
    """A folder shaped like one data set of AREA's release: the three sets, `lines[c]` in every class's file
    (`files[set]`: the file stems of that set, default the class names with underscores) and the class list."""
    for sub in ("generated_descriptions", "generated_descriptions_occ", "generated_descriptions_aug"):
        (root / sub).mkdir(parents=True)
        for c in (files or {}).get(sub, classes):
            (root / sub / f"{c.replace(' ', '_').replace('/', '_')}_descriptions.txt").write_text("".join(
                f"{line}\n" for line in lines[c]))
    (root / "generated_descriptions" / listing).write_text("".join(f"{c}\n" for c in classes))


def test_cub_like_release_imports_with_spacils_class_names(tmp_path):
    """CUB's release: `class_names.txt` (not classnames.txt) listing `001.Black_footed_Albatross`...: the classes get the
    names spacil's CUB has (the index dropped), so the store's classes match; a file the list does not name is left."""
    from spacil.store.area_texts import import_area_folders, read_area_sets

    listed = ["002.Laysan_Albatross", "001.Black_footed_Albatross"]
    lines = {c: [f"{c}_000{i}.jpg\tA bird {i}." for i in range(2)] for c in [*listed, "003.Sooty_Albatross"]}
    _release_folder(tmp_path / "CUB", listed, lines, files={"generated_descriptions": list(lines)},
                    listing="class_names.txt")
    imported = import_area_folders(tmp_path / "CUB")
    assert list(imported["sets"]["clean"]) == ["Laysan Albatross", "Black footed Albatross"]
    file = tmp_path / "cub.json"
    file.write_text(json.dumps(imported))
    rows = read_area_sets(file, ["Black footed Albatross", "Laysan Albatross"])  # spacil's CUB names
    assert rows["occluded"][0] == lines["001.Black_footed_Albatross"]


def test_a_release_missing_classes_imports_with_allow_missing_and_describe_fills_them(shapes_root, tmp_path, monkeypatch,
                                                                                     capsys):
    """The Aircraft/Cars case: a set of the release lacks a class. Refused (one line, exit 2); --allow-missing writes the
    rest and names the missing class in one line; `spacil extract`'s reader refuses the file, pointing at describe;
    `spacil describe --area-sets --out SAME_FILE` captions that class in that set only, a rerun asks nothing, and the file
    then reads for every class."""
    from llm_server import LLMServer

    from spacil.data import open_dataset
    from spacil.store.area_texts import read_area_sets

    names, splits = open_dataset("shapes", shapes_root)
    train = splits["train"]
    images = {c: [Path(train.paths[r]).name for r, label in enumerate(train.labels) if label == c][:2]
              for c in range(len(names))}
    # the release captioned one image per class (its image files need not be this data root's)
    lines = {names[c]: [f"{image}\tA released caption of {names[c]}." for image in images[c][:1]] for c in images}
    lacking = names[1]
    _release_folder(tmp_path / "release", names, lines,
                    files={"generated_descriptions_occ": [n for n in names if n != lacking]})
    out = tmp_path / "sets.json"
    imp = ["descriptions", "import", "--format", "area-sets", str(tmp_path / "release"), "--out", str(out)]
    capsys.readouterr()
    assert main(imp) == 2 and not out.exists() and "--allow-missing" in capsys.readouterr().err
    assert main([*imp, "--allow-missing"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"occluded: '{lacking}'" in err and "describe --area-sets" in err
    with pytest.raises(InputError, match="describe --area-sets"):
        read_area_sets(out, names)
    monkeypatch.setenv("SPACIL_TEST_KEY", "k")
    args = ["describe", "--dataset", "shapes", "--data-root", str(shapes_root), "--out", str(out), "--area-sets",
            "--images-per-class", "2", "--api-key-env", "SPACIL_TEST_KEY", "--quiet"]
    with LLMServer(count=2) as server:
        assert main([*args, "--base-url", server.base_url, "--classes", lacking]) == 0
        assert len(server.requests) == 2  # two images of one class, in the one set that lacked it
        assert main([*args, "--base-url", server.base_url]) == 0
        assert len(server.requests) == 2  # a rerun (every class asked for) asks nothing
    rows = read_area_sets(out, names)
    assert len(rows["occluded"][1]) == 2 and rows["clean"][1] == lines[lacking]
    assert rows["occluded"][0] == lines[names[0]]
