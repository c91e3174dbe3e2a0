"""kNN and linear probe against small references computed independently of the implementation."""
from __future__ import annotations

import math

import pytest
import torch

from ssl_models.evaluation import (EvaluationError, check_label_sets, extract_features, knn_evaluate, knn_scores,
                                   linear_probe, raw_pixel_features, stratified_split, topk_accuracy)

# four training points in 2-D and one query; cosine similarities worked out by hand
TRAIN = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
TRAIN_LABELS = torch.tensor([0, 1, 1, 2])
QUERY = torch.tensor([[1.0, 0.2]])
COS = {0: 1 / math.sqrt(1.04), 1: 0.2 / math.sqrt(1.04), 2: 1.2 / (math.sqrt(1.04) * math.sqrt(2)), 3: -1 / math.sqrt(1.04)}


def test_knn_vote_matches_hand_computation():
    # k=3 neighbours are points 0 (class 0), 2 and 1 (class 1); point 3 (class 2) is out
    for temperature in (0.1, 1.0):
        scores = knn_scores(TRAIN, TRAIN_LABELS, QUERY, k=3, temperature=temperature, num_classes=3)
        expected = [math.exp(COS[0] / temperature), math.exp(COS[1] / temperature) + math.exp(COS[2] / temperature), 0.0]
        assert scores[0].tolist() == pytest.approx(expected, rel=1e-5)
    # the temperature decides the vote: sharp (T=0.1) -> the single closest point, flat (T=1) -> the two class-1 points
    sharp = knn_scores(TRAIN, TRAIN_LABELS, QUERY, k=3, temperature=0.1, num_classes=3)
    flat = knn_scores(TRAIN, TRAIN_LABELS, QUERY, k=3, temperature=1.0, num_classes=3)
    assert sharp.argmax().item() == 0 and flat.argmax().item() == 1
    # features are l2-normalised first: scaling a feature does not change the vote
    scaled = knn_scores(TRAIN * torch.tensor([[5.0], [0.1], [3.0], [2.0]]), TRAIN_LABELS, QUERY * 7, k=3,
                        temperature=1.0, num_classes=3)
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


def _blobs(n_per_class: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(3, 16) * 6.0
    x = torch.cat([c + torch.randn(n_per_class, 16, generator=gen) for c in centres])
    y = torch.arange(3).repeat_interleave(n_per_class)
    return x, y


def test_linear_probe_separates_a_linearly_separable_set():
    x, y = _blobs(60, 0)
    xt, yt = _blobs(30, 1)
    # the blobs are 6 sigma apart along their own axis: a hyperplane separates them all
    assert torch.all((xt[:, :3].argmax(1) == yt))
    result = linear_probe(x, y, xt, yt, num_classes=3, epochs=60, lr=0.05, weight_decay=0.0, batch_size=0,
                          val_fraction=0.2, patience=20, seed=0, device="cpu")
    assert result["top1"] == 1.0
    assert result["n_val"] == 36 and result["n_fit"] == 144
    minibatch = linear_probe(x, y, xt, yt, num_classes=3, epochs=20, lr=0.01, batch_size=32, seed=0, device="cpu")
    assert minibatch["top1"] == 1.0


def test_linear_probe_early_stops_on_validation_not_test():
    x, y = _blobs(40, 0)
    # random labels: nothing to learn, validation accuracy stops improving and the probe stops early
    y_random = torch.randint(0, 3, y.shape, generator=torch.Generator().manual_seed(3))
    result = linear_probe(x, y_random, x[:10], y[:10], num_classes=3, epochs=500, lr=0.05, patience=5,
                          val_fraction=0.25, device="cpu")
    assert result["epochs_run"] < 500
    assert result["epochs_run"] == result["best_epoch"] + 5


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
    feats = extract_features(model, images, batch_size=3, transform=lambda b: (b.float() / 255 - 0.5) / 0.25,
                             device="cpu", progress=False)
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
