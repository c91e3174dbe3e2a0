"""kNN, the logistic-regression probe and the bootstrap against references computed independently of the
implementation (hand computations, scikit-learn fitted directly, binomial coverage)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ssl_models.evaluation import (
    EvaluationError,
    bootstrap_counts,
    bootstrap_interval,
    check_label_sets,
    extract_features,
    knn_evaluate,
    knn_scores,
    linear_probe,
    paired_bootstrap,
    raw_pixel_features,
    stratified_split,
    topk_accuracy,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# four training points in 2-D and one query; cosine similarities worked out by hand
TRAIN = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
TRAIN_LABELS = torch.tensor([0, 1, 1, 2])
QUERY = torch.tensor([[1.0, 0.2]])
COS = {
    0: 1 / math.sqrt(1.04),
    1: 0.2 / math.sqrt(1.04),
    2: 1.2 / (math.sqrt(1.04) * math.sqrt(2)),
    3: -1 / math.sqrt(1.04),
}


def test_knn_vote_matches_hand_computation():
    # k=3 neighbours are points 0 (class 0), 2 and 1 (class 1); point 3 (class 2) is out
    for temperature in (0.1, 1.0):
        scores = knn_scores(TRAIN, TRAIN_LABELS, QUERY, k=3, temperature=temperature, num_classes=3)
        expected = [
            math.exp(COS[0] / temperature),
            math.exp(COS[1] / temperature) + math.exp(COS[2] / temperature),
            0.0,
        ]
        assert scores[0].tolist() == pytest.approx(expected, rel=1e-5)
    # the temperature decides the vote: sharp (T=0.1) -> the single closest point, flat (T=1) -> the two class-1 points
    sharp = knn_scores(TRAIN, TRAIN_LABELS, QUERY, k=3, temperature=0.1, num_classes=3)
    flat = knn_scores(TRAIN, TRAIN_LABELS, QUERY, k=3, temperature=1.0, num_classes=3)
    assert sharp.argmax().item() == 0 and flat.argmax().item() == 1
    # features are l2-normalised first: scaling a feature does not change the vote
    scaled = knn_scores(
        TRAIN * torch.tensor([[5.0], [0.1], [3.0], [2.0]]), TRAIN_LABELS, QUERY * 7, k=3, temperature=1.0, num_classes=3
    )
    assert torch.allclose(scaled, flat, rtol=1e-5)


def test_knn_evaluate_reports_top1_top5_per_k_and_caps_k():
    queries = torch.tensor([[1.0, 0.2], [1.0, 0.2]])
    result = knn_evaluate(TRAIN, TRAIN_LABELS, queries, torch.tensor([0, 1]), ks=(3, 200), temperature=1.0)
    # k=3, T=1 predicts class 1 for both queries -> top-1 1/2; 3 classes -> top-5 is 1
    assert result["knn_top1_k3"] == pytest.approx(0.5)
    assert result["knn_top5_k3"] == 1.0
    # k=200 > 4 training points: all four vote; class 1 still has the largest sum with T=1
    assert result["knn_top1_k200"] == pytest.approx(0.5)


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    acc = topk_accuracy(scores, torch.tensor([2, 0]), (1, 2))
    assert acc == {1: 0.5, 2: 1.0}


def _blobs(n_per_class: int, seed: int, spread: float = 6.0, dim: int = 16, classes: int = 3):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(classes, dim) * spread
    x = torch.cat([c + torch.randn(n_per_class, dim, generator=gen) for c in centres])
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return x, y


def test_linear_probe_separates_a_linearly_separable_set():
    x, y = _blobs(60, 0)
    xt, yt = _blobs(30, 1)
    # the blobs are 6 sigma apart along their own axis: a hyperplane separates them all
    assert torch.all(xt[:, :3].argmax(1) == yt)
    for backend in ("sklearn", "torch"):
        # separable: the weakly regularised end of the grid would only run L-BFGS to max_iter here
        result = linear_probe(
            x, y, xt, yt, num_classes=3, c_grid=[0.01, 0.1], val_fraction=0.2, seed=0, device="cpu", backend=backend
        )
        assert result["top1"] == 1.0 and result["backend"] == backend
        assert result["n_val"] == 36 and result["n_fit"] == 144


def _overlapping(seed: int, n_per_class: int = 150):
    # 4 classes, 24-d, centres 1.2 sigma apart: the best linear classifier is far from perfect, so C matters
    return _blobs(n_per_class, seed, spread=1.2, dim=24, classes=4)


def test_linear_probe_is_sklearn_logistic_regression_at_the_c_chosen_on_validation():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = _overlapping(0)
    xt, yt = _overlapping(1, 100)
    grid = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
    result = linear_probe(x, y, xt, yt, c_grid=grid, val_fraction=0.2, seed=3, device="cpu", backend="sklearn")
    # C: an independent fit of each grid value on the fit part, scored on the validation part
    fit_idx, val_idx = stratified_split(y, 0.2, seed=3)
    scaler = StandardScaler().fit(x[fit_idx].double().numpy())
    val_acc = {
        c: LogisticRegression(C=c, max_iter=1000)
        .fit(scaler.transform(x[fit_idx].double().numpy()), y[fit_idx].numpy())
        .score(scaler.transform(x[val_idx].double().numpy()), y[val_idx].numpy())
        for c in grid
    }
    assert result["val_top1_by_c"] == pytest.approx(val_acc, abs=1e-9)
    assert val_acc[result["c"]] == max(val_acc.values())
    assert len(set(val_acc.values())) > 1  # the grid makes a difference on these features
    # the final model: scikit-learn's optimum at that C on all of train, standardised with train's statistics
    scaler = StandardScaler().fit(x.double().numpy())
    direct = LogisticRegression(C=result["c"], max_iter=1000).fit(scaler.transform(x.double().numpy()), y.numpy())
    predicted = torch.from_numpy(direct.predict(scaler.transform(xt.double().numpy())))
    assert torch.equal(result["hits"], predicted == yt)
    assert result["top1"] == pytest.approx((predicted == yt).double().mean().item(), abs=1e-12)


def test_choosing_c_never_looks_at_the_test_split():
    x, y = _overlapping(0)
    xt, yt = _overlapping(1, 100)
    honest = linear_probe(x, y, xt, yt, val_fraction=0.2, seed=0, device="cpu", backend="sklearn")
    # a "leaking" test split: labels permuted, features scrambled. If C were chosen on test, it would move.
    gen = torch.Generator().manual_seed(7)
    permuted = yt[torch.randperm(len(yt), generator=gen)]
    scrambled = xt[:, torch.randperm(xt.shape[1], generator=gen)] * 3 + 1
    for test_x, test_y in ((xt, permuted), (scrambled, yt), (scrambled, permuted)):
        leaked = linear_probe(x, y, test_x, test_y, val_fraction=0.2, seed=0, device="cpu", backend="sklearn")
        assert leaked["c"] == honest["c"] and leaked["val_top1_by_c"] == honest["val_top1_by_c"]
    assert (
        linear_probe(x, y, xt, permuted, val_fraction=0.2, seed=0, device="cpu", backend="sklearn")["top1"]
        < honest["top1"] - 0.2
    )


def test_torch_lbfgs_reaches_the_sklearn_optimum():
    x, y = _overlapping(2, 250)
    xt, yt = _overlapping(3, 250)
    sk = linear_probe(x, y, xt, yt, seed=0, device="cpu", backend="sklearn")
    th = linear_probe(x, y, xt, yt, seed=0, device="cpu", backend="torch")
    assert abs(sk["top1"] - th["top1"]) <= 0.005  # within 0.5 points on the same features
    assert th["c"] == sk["c"]
    # and at one fixed C the two solvers give the same classifier (same objective, same optimum)
    for c in (1e-3, 1.0):
        a = linear_probe(x, y, xt, yt, c_grid=[c], device="cpu", backend="sklearn")
        b = linear_probe(x, y, xt, yt, c_grid=[c], device="cpu", backend="torch")
        assert (a["hits"] != b["hits"]).double().mean().item() <= 0.005 and b["converged"]


def test_probe_backend_auto_and_grid_checks():
    from ssl_models.evaluation import AUTO_TORCH_ELEMENTS, resolve_probe_backend

    assert resolve_probe_backend("auto", 4000, 512, torch.device("cpu")) == "sklearn"
    assert resolve_probe_backend("auto", AUTO_TORCH_ELEMENTS, 2, torch.device("cpu")) == "torch"
    assert resolve_probe_backend("auto", 10, 10, torch.device("cuda")) == "torch"
    assert resolve_probe_backend("sklearn", 10**9, 10, torch.device("cuda")) == "sklearn"
    x, y = _blobs(10, 0)
    with pytest.raises(EvaluationError, match="needs a validation split"):
        linear_probe(x, y, x, y, val_fraction=0.0, device="cpu")
    single = linear_probe(x, y, x, y, c_grid=[0.5], val_fraction=0.0, device="cpu")
    assert single["c"] == 0.5 and single["n_val"] == 0 and single["val_top1"] is None


def test_unlabelled_test_rows_are_dropped_and_an_unlabelled_test_split_refused():
    x, y = _overlapping(0, 40)
    xt, yt = _overlapping(1, 20)
    yt_partial = yt.clone()
    yt_partial[::4] = -1
    kept = yt_partial >= 0
    knn_all, hits = knn_evaluate(x, y, xt, yt_partial, ks=(5,), return_hits=True)
    assert knn_all == knn_evaluate(x, y, xt[kept], yt[kept], ks=(5,))  # the -1 rows count neither way
    assert len(hits["knn_top1_k5"]) == int(kept.sum())
    probe = linear_probe(x, y, xt, yt_partial, device="cpu")
    assert probe["top1"] == linear_probe(x, y, xt[kept], yt[kept], device="cpu")["top1"]
    assert len(probe["hits"]) == int(kept.sum())
    nothing = torch.full_like(yt, -1)
    for fn in (
        lambda: knn_evaluate(x, y, xt, nothing),
        lambda: linear_probe(x, y, xt, nothing, device="cpu"),
        lambda: check_label_sets(y, nothing, split="test"),
    ):
        with pytest.raises(EvaluationError, match="the test split has no labelled images") as err:
            fn()
        assert "\n" not in str(err.value)


def test_old_probe_keys_are_refused_with_one_line():
    import yaml

    from stages.workspace.common import ConfigError
    from stages.workspace.config import parse_params

    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    assert parse_params(raw).evaluate.linear_probe.c_grid[0] == 1e-4
    for key, value in (("epochs", 200), ("lr", 0.01), ("weight_decay", 1e-4), ("batch_size", 0), ("patience", 20)):
        bad = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
        bad["evaluate"]["linear_probe"][key] = value
        with pytest.raises(ConfigError) as err:
            parse_params(bad)
        assert str(err.value) == f"params.yaml: evaluate.linear_probe.{key}: unknown key"
    for probe, fragment in (
        ({"c_grid": []}, "c_grid: Value error, needs at least one value"),
        ({"c_grid": [1.0, -1.0]}, "each > 0"),
        ({"val_fraction": 0.0}, "give c_grid a single value"),
        ({"backend": "jax"}, "evaluate.linear_probe.backend"),
    ):
        bad = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
        bad["evaluate"]["linear_probe"].update(probe)
        with pytest.raises(ConfigError, match=fragment):
            parse_params(bad)
    bad = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    bad["evaluate"]["bootstrap"]["resamples"] = 500
    with pytest.raises(ConfigError, match="evaluate.bootstrap.resamples"):
        parse_params(bad)


# ------------------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_is_reproducible_from_the_seed():
    hits = torch.rand(300, generator=torch.Generator().manual_seed(0)) < 0.8
    a = bootstrap_interval(hits, bootstrap_counts(300, 1000, seed=5))
    assert a == bootstrap_interval(hits, bootstrap_counts(300, 1000, seed=5))
    assert a != bootstrap_interval(hits, bootstrap_counts(300, 1000, seed=6))
    assert a["low"] < hits.double().mean().item() < a["high"]


def test_bootstrap_intervals_cover_the_true_accuracy_at_about_the_nominal_rate():
    gen = torch.Generator().manual_seed(0)
    n, p, trials = 400, 0.85, 200
    covered = 0
    counts = bootstrap_counts(n, 1000, seed=0)  # the trials' data are independent draws: one resampling serves all
    for _ in range(trials):
        hits = torch.rand(n, generator=gen) < p
        iv = bootstrap_interval(hits, counts, level=0.95)
        covered += iv["low"] <= p <= iv["high"]
    assert 0.90 <= covered / trials <= 0.99, covered
    # and the width is what the binomial gives: about 2 x 1.96 x sqrt(p (1 - p) / n)
    assert iv["high"] - iv["low"] == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / n), rel=0.25)


def test_paired_bootstrap_ties_for_identical_predictions_and_separates_clear_differences():
    gen = torch.Generator().manual_seed(1)
    n = 1000
    counts = bootstrap_counts(n, 1000, seed=0)
    base = torch.rand(n, generator=gen) < 0.9
    same = paired_bootstrap(base, base.clone(), counts)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0, "verdict": "ties"}
    # two identical feature sets through the same probe: identical hits, a tie
    x, y = _overlapping(0, 60)
    xt, yt = _overlapping(1, 50)
    a = linear_probe(x, y, xt, yt, device="cpu")["hits"]
    b = linear_probe(x.clone(), y, xt.clone(), yt, device="cpu")["hits"]
    assert paired_bootstrap(a, b, bootstrap_counts(len(yt), 1000, seed=0))["verdict"] == "ties"
    # 30 more images right in 1,000 (and none fewer): beats; the reverse trails
    better = base.clone()
    better[(~base).nonzero().flatten()[:30]] = True
    win = paired_bootstrap(better, base, counts)
    assert win["verdict"] == "beats" and win["difference"] == pytest.approx(0.03) and win["low"] > 0
    assert win["p_value"] < 0.01
    lose = paired_bootstrap(base, better, counts)
    assert lose["verdict"] == "trails" and lose["high"] < 0
    # 2 images in 1,000 (the README's old margins): a tie
    slight = base.clone()
    slight[(~base).nonzero().flatten()[:5]] = True
    slight[base.nonzero().flatten()[:3]] = False
    assert paired_bootstrap(slight, base, counts)["verdict"] == "ties"


def test_baseline_cache_recomputes_entries_without_fitting_hits(tmp_path):
    from stages.evaluate import BASELINE_CACHE, cached, decode_hits, encode_hits
    from stages.workspace.lineage import digest

    names = ["knn_top1_k20", "linear_probe_top1"]
    calls = []

    def compute():
        calls.append(1)
        return {"linear_probe_top1": 0.5}, {n: torch.tensor([True, False, True, False]) for n in names}

    key = {"data_version": "abc", "seed": 0}
    metrics, hits = cached(tmp_path, "raw_pixels", key, names, 4, compute)
    assert calls == [1] and hits["knn_top1_k20"].tolist() == [True, False, True, False]
    again = cached(tmp_path, "raw_pixels", key, names, 4, compute)
    assert (
        calls == [1] and again[0] == metrics and torch.equal(again[1]["linear_probe_top1"], hits["linear_probe_top1"])
    )
    # a test split of another size, or an entry written before hits were cached: recomputed, no crash
    cached(
        tmp_path,
        "raw_pixels",
        key,
        names,
        5,
        lambda: calls.append(2) or ({}, {n: torch.ones(5, dtype=torch.bool) for n in names}),
    )
    assert calls == [1, 2]
    (path,) = [p for p in (tmp_path / BASELINE_CACHE).glob("*.json")]
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({"key": doc["key"], "metrics": doc["metrics"]}))  # the format-1 layout
    cached(
        tmp_path,
        "raw_pixels",
        key,
        names,
        5,
        lambda: calls.append(3) or ({}, {n: torch.ones(5, dtype=torch.bool) for n in names}),
    )
    assert calls == [1, 2, 3]
    # format-1 entries lived under a digest without the format: never even read
    assert not (tmp_path / BASELINE_CACHE / f"raw_pixels-{digest(key)[:20]}.json").exists()
    assert decode_hits(encode_hits({"a": torch.tensor([True, False])}), ["a"], 2)["a"].tolist() == [True, False]
    assert decode_hits({"a": "01x"}, ["a"], 3) is None


def test_stratified_split_keeps_every_class_in_both_parts():
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 2)
    fit, val = stratified_split(y, 0.2, seed=0)
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(len(y)))
    assert sorted(y[val].tolist()) == [0, 0, 1, 2]
    again = stratified_split(y, 0.2, seed=0)
    assert torch.equal(again[1], val)


def test_classes_absent_from_train_are_one_line_error():
    with pytest.raises(EvaluationError) as err:
        check_label_sets(torch.tensor([0, 1, 1]), torch.tensor([0, 2, 3]), ["zero", "one", "two", "three"])
    message = str(err.value)
    assert "\n" not in message and "two, three" in message and "absent from train" in message
    with pytest.raises(EvaluationError, match="no labelled images"):
        check_label_sets(torch.tensor([-1, -1]), torch.tensor([0]))
    check_label_sets(torch.tensor([0, 1, 2]), torch.tensor([2, 0]))


def test_extract_features_batches_without_grad_and_restores_mode():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.Dropout(0.5))
    model.feature_dim = 5
    model.train()
    images = torch.randint(0, 256, (7, 3, 2, 2), dtype=torch.uint8)
    feats = extract_features(
        model, images, batch_size=3, transform=lambda b: (b.float() / 255 - 0.5) / 0.25, device="cpu", progress=False
    )
    assert feats.shape == (7, 5) and not feats.requires_grad
    assert model.training
    # eval mode (dropout off) and the same normalisation give the same features as one big batch
    with torch.no_grad():
        ref = model.eval()((images.float() / 255 - 0.5) / 0.25)
    assert torch.allclose(feats, ref, atol=1e-6)
    model.feature_dim = 6
    with pytest.raises(EvaluationError, match="expected"):
        extract_features(model, images, batch_size=4, device="cpu", progress=False)


def test_raw_pixel_features_shrink_large_images():
    small = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    assert raw_pixel_features(small).shape == (2, 784)
    assert raw_pixel_features(small).max() == 1.0
    big = torch.zeros((2, 3, 64, 48), dtype=torch.uint8)
    assert raw_pixel_features(big, max_side=32).shape == (2, 3 * 32 * 24)
