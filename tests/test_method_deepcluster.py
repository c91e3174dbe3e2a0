"""DeepCluster: PCA-whitening and the weighted pseudo-label loss against numpy, k-means finds separated groups
and leaves no cluster empty, the assignment under 2 gloo processes equals 1 process on the union, the classifier
is reset every epoch, 20 steps on digits lower the loss, and export keeps the backbone only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_models import build_backbone, registry
from ssl_models.methods.deepcluster import DeepCluster, PseudoLabelLoss, kmeans, pca_whiten
from support.dist_utils import run_distributed
from support.origins_utils import digits, export_loads_in_torchvision, numpy_cross_entropy, twenty_steps_lower_the_loss
from support.tiny_ssl import TinyBackbone, write_tiny_shards

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registered_as_grouping_of_the_origins():
    spec = registry.get("deepcluster")
    assert spec.family == "origins" and spec.cls.category == "grouping" and spec.cls.uses_dataset


def test_pca_whitening_matches_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    y = pca_whiten(x, 3)
    xn = x.numpy() - x.numpy().mean(axis=0)
    vals, vecs = np.linalg.eigh(np.cov(xn, rowvar=False))
    order = np.argsort(vals)[::-1][:3]
    ref = xn @ vecs[:, order] / np.sqrt(vals[order] + 1e-5)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    # eigenvector signs are arbitrary: compare the Gram matrices (what k-means sees)
    np.testing.assert_allclose(y.numpy() @ y.numpy().T, ref @ ref.T, atol=1e-8)


def test_weighted_pseudo_label_loss_matches_numpy():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(10, 5, generator=g), torch.randint(0, 5, (10,), generator=g)
    weights = torch.rand(5, generator=g) + 0.1
    assert float(PseudoLabelLoss()(logits, labels, weights)) == pytest.approx(
        numpy_cross_entropy(logits.numpy(), labels.numpy(), weights.numpy()), abs=1e-6
    )


def test_kmeans_recovers_separated_groups_and_refills_empty_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(60) % 3
    x = centres[truth] + 0.1 * torch.randn(60, 2, generator=g)
    assign = kmeans(x, 3, iterations=10, seed=1)
    # same partition as the truth, whatever the cluster numbering
    assert len({(int(a), int(t)) for a, t in zip(assign, truth)}) == 3
    torch.testing.assert_close(assign, kmeans(x, 3, iterations=10, seed=1))  # deterministic for a seed
    # 6 clusters on 3 tight groups of which 2 points coincide: without refilling, clusters go empty
    dup = torch.cat([x, x[:1].repeat(5, 1)])
    many = kmeans(dup, 6, iterations=10, seed=0)
    assert torch.bincount(many, minlength=6).min() > 0


def _features_pass(images: torch.Tensor, keys: list[str], batch: int = 8):
    def dataset():
        for i in range(0, len(keys), batch):
            yield [images[i : i + batch]], torch.zeros(0), keys[i : i + batch]

    return dataset


def _method(seed: int = 0) -> DeepCluster:
    torch.manual_seed(seed)
    return DeepCluster(TinyBackbone(in_chans=1, width=8), num_clusters=5, pca_dim=4, kmeans_iterations=10)


def _ddp_clustering_worker(rank: int, world_size: int, images: torch.Tensor, keys: list[str]) -> dict:
    method = _method()
    mine = list(range(rank, len(keys), world_size))  # interleaved shares, as the loader's units are
    method.on_epoch_start(0, _features_pass(images[mine], [keys[i] for i in mine]))
    return {"assignments": method.assignments, "keys": method.keys}


@pytest.mark.integration
def test_assignment_under_two_gloo_processes_equals_one_process_on_the_union():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(30, 1, 8, 8, generator=g)
    keys = [f"train_{i:04d}" for i in torch.randperm(30, generator=g).tolist()]  # not in sorted order
    single = _method()
    single.on_epoch_start(0, _features_pass(images, keys))
    per_rank = run_distributed(_ddp_clustering_worker, 2, (images, keys))
    for result in per_rank:
        assert result["keys"] == single.keys == sorted(keys)
        torch.testing.assert_close(result["assignments"], single.assignments)
    assert torch.bincount(single.assignments, minlength=5).min() > 0


def test_classifier_is_reset_each_epoch_and_batches_get_their_images_pseudo_labels():
    images = torch.randn(20, 1, 8, 8)
    keys = [f"k{i:02d}" for i in range(20)]
    method = _method()
    method.on_epoch_start(0, _features_pass(images, keys))
    with torch.no_grad():
        method.classifier.weight.fill_(7.0)
    method.on_epoch_start(1, _features_pass(images, keys))
    assert not torch.any(method.classifier.weight == 7.0)
    method.on_batch(["k03", "k17"])
    torch.testing.assert_close(method._batch_labels, method.assignments[[3, 17]])
    counts = torch.bincount(method.assignments, minlength=5).float()
    # re-weighting: every cluster carries the same total weight over the training set
    torch.testing.assert_close(method.class_weights * counts, torch.full((5,), 20 / 5))


def test_more_clusters_than_images_is_a_training_error():
    from ssl_models.engine import TrainingError

    method = DeepCluster(TinyBackbone(in_chans=1, width=8), num_clusters=50, pca_dim=4)
    with pytest.raises(TrainingError, match="num_clusters 50 exceeds the 20"):
        method.on_epoch_start(0, _features_pass(torch.randn(20, 1, 8, 8), [str(i) for i in range(20)]))


def test_twenty_steps_lower_the_loss_on_digits():
    images, _ = digits(256)
    keys = [f"d{i:04d}" for i in range(len(images))]
    torch.manual_seed(0)
    method = DeepCluster(
        build_backbone("resnet18", in_chans=1, small_image=True, width=8, stem_stride=2), num_clusters=20, pca_dim=32
    )
    method.on_epoch_start(0, _features_pass(images, keys, batch=64))
    before, after = twenty_steps_lower_the_loss(
        method, images, before_each=lambda index: method.on_batch([keys[i] for i in index])
    )
    assert after < before - 0.05, (before, after)


def test_export_keeps_the_backbone_only_and_it_loads_in_torchvision(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", train=16, test=16)
    state = export_loads_in_torchvision("deepcluster", tmp_path, shards, num_clusters=4, pca_dim=8)
    assert any(k.startswith("classifier.") for k in state) and state["assignments"].shape == (16,)
