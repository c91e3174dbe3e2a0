"""DeepCluster (Caron, Bojanowski, Joulin & Douze 2018, "Deep Clustering for Unsupervised Learning of Visual
Features", arXiv 1807.05520): grouping; every epoch k-means clusters the backbone's features of the whole
training set and the network is trained to predict those cluster assignments as pseudo-labels."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import TrainingError
from ..precision import float32_loss
from ..registry import register
from .base import SSLMethod


def pca_whiten(features: Tensor, dim: int, eps: float = 1e-5) -> Tensor:
    """The paper's preprocessing before k-means (sec. 3.2): PCA to ``dim`` dimensions, whitening, l2 norm.

        y = l2normalise( diag(lambda_1..d + eps)^(-1/2) U_d^T (x - mean) )

    with (lambda, U) the eigenpairs of the features' covariance, largest first. float64 throughout.
    """
    x = features.double()
    x = x - x.mean(dim=0, keepdim=True)
    cov = x.T @ x / max(x.shape[0] - 1, 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    d = min(dim, x.shape[1])
    eigvals, eigvecs = eigvals.flip(0)[:d], eigvecs.flip(1)[:, :d]
    y = (x @ eigvecs) / torch.sqrt(eigvals.clamp_min(0) + eps)
    return F.normalize(y, dim=1)


def kmeans(x: Tensor, k: int, *, iterations: int = 20, seed: int = 0, split_eps: float = 1e-4) -> Tensor:
    """Lloyd's k-means on the rows of ``x`` (N x d); returns assignments (N,) in [0, k).

    Initial centroids: k distinct points drawn with a generator seeded by ``seed`` (faiss's default init).
    Empty clusters (paper, sec. 3.3, "Empty clusters"): an empty cluster takes the centroid of the largest
    cluster with a small perturbation (+eps d, the large one -eps d, d a random direction), and the large
    cluster's points are split between the two by nearest centroid. The same inputs and seed give the same
    assignments on every process.
    """
    n = x.shape[0]
    if k > n:
        raise ValueError(f"k-means: {k} clusters for {n} points")
    g = torch.Generator().manual_seed(int(seed))
    x = x.double()
    centroids = x[torch.randperm(n, generator=g)[:k]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for it in range(iterations + 1):
        assign = torch.cdist(x, centroids).argmin(dim=1)
        counts = torch.bincount(assign, minlength=k)
        for empty in (counts == 0).nonzero().flatten().tolist():
            big = int(counts.argmax())
            direction = torch.randn(x.shape[1], generator=g, dtype=x.dtype)
            base = centroids[big].clone()
            centroids[empty], centroids[big] = base + split_eps * direction, base - split_eps * direction
            members = (assign == big).nonzero().flatten()
            pair = torch.tensor([big, empty])
            assign[members] = pair[torch.cdist(x[members], centroids[pair]).argmin(dim=1)]
            counts = torch.bincount(assign, minlength=k)
        if it == iterations:
            break
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].to(x.dtype), centroids)
    return assign


class PseudoLabelLoss(nn.Module):
    """L = sum_i w_{y_i} -log softmax(W f(x_i))_{y_i} / sum_i w_{y_i}: cross entropy on the k-means pseudo-labels
    y_i, weighted w_c = 1 / n_c per cluster (n_c its size in the whole training set). The paper samples images
    uniformly over the pseudo-classes instead (sec. 3.3, "Trivial parametrization"); a streaming loader cannot,
    and the weighting gives every cluster the same expected total weight, which is the same objective."""

    @float32_loss
    def forward(self, logits: Tensor, labels: Tensor, class_weights: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels, weight=class_weights.to(logits.dtype))


@register("deepcluster", family="origins", category="grouping")
class DeepCluster(SSLMethod):
    """Backbone -> linear classifier over ``num_clusters`` pseudo-classes (dropped at export).

    At each epoch start (:meth:`on_epoch_start`): features of every training image (evaluation transform,
    eval mode), gathered from all ranks under DDP and put in key order, so every rank clusters the same matrix
    with the same seed and gets the same assignment as one process on the union; PCA-whitening + l2 norm, k-means,
    pseudo-labels; the classifier is re-initialised (paper: a new top layer each epoch, since the cluster
    indices are arbitrary). During the epoch :meth:`on_batch` looks up the pseudo-labels of the batch's keys.

    Defaults (paper): k = 10,000 (10 x the ImageNet classes), PCA to 256 dimensions, 20 k-means iterations
    (faiss), SGD lr 0.05, momentum 0.9, weight decay 1e-5 at batch 256. Assignments and the key order live in
    the module's state, so a run resumed inside an epoch keeps that epoch's clustering. Digits override k.
    """

    augment = "mim"  # the paper's random resized crop + flip
    uses_dataset = True
    optimizer: dict[str, Any] = {
        "name": "sgd",
        "base_lr": 0.05,
        "weight_decay": 1e-5,
        "momentum": 0.9,
        "lr_scaling": "linear",
        "warmup_epochs": 0,
    }
    default_backbone: dict[str, Any] = {"name": "resnet18", "small_image": True}

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_clusters: int = 10000,
        pca_dim: int = 256,
        kmeans_iterations: int = 20,
        cluster_seed: int = 0,
        reweight: bool = True,
    ) -> None:
        super().__init__()
        if num_clusters < 2 or pca_dim < 1 or kmeans_iterations < 1:
            raise ValueError(
                f"deepcluster: need num_clusters >= 2, pca_dim >= 1, kmeans_iterations >= 1 "
                f"(got {num_clusters}, {pca_dim}, {kmeans_iterations})"
            )
        self.backbone = backbone
        self.num_clusters, self.pca_dim, self.kmeans_iterations = num_clusters, pca_dim, kmeans_iterations
        self.cluster_seed, self.reweight = cluster_seed, reweight
        self.classifier = nn.Linear(backbone.feature_dim, num_clusters)
        self.criterion = PseudoLabelLoss()
        self.register_buffer("assignments", torch.zeros(0, dtype=torch.long))
        self.register_buffer("class_weights", torch.ones(num_clusters))
        self.keys: list[str] = []
        self._index: dict[str, int] = {}
        self._batch_labels: Tensor | None = None

    # -- state beyond tensors: the key order of ``assignments``
    def get_extra_state(self) -> dict[str, Any]:
        return {"keys": list(self.keys)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.keys = list(state.get("keys") or [])
        self._index = {k: i for i, k in enumerate(self.keys)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("assignments",):  # sized by the data, not the constructor
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the clustering step
    @torch.no_grad()
    def dataset_features(self, dataset: Iterable) -> tuple[Tensor, list[str]]:
        """Backbone features (eval mode) and keys of this rank's share of the training set."""
        was_training = self.training
        device = next(self.parameters()).device
        self.eval()
        feats, keys = [], []
        try:
            for views, _labels, batch_keys in dataset:
                feats.append(self.backbone(views[0].to(device)).float().cpu())
                keys.extend(batch_keys)
        finally:
            self.train(was_training)
        return torch.cat(feats), keys

    def cluster(self, features: Tensor, keys: list[str], epoch: int) -> None:
        """Pseudo-labels for the global feature set (features/keys of every rank, any order)."""
        order = sorted(range(len(keys)), key=keys.__getitem__)
        features, keys = features[order], [keys[i] for i in order]
        if self.num_clusters > len(keys):
            raise TrainingError(
                f"deepcluster: num_clusters {self.num_clusters} exceeds the {len(keys)} training "
                f"images; lower method.deepcluster.num_clusters"
            )
        x = pca_whiten(features, self.pca_dim)
        assign = kmeans(
            x, self.num_clusters, iterations=self.kmeans_iterations, seed=self.cluster_seed * 100_003 + epoch
        )
        counts = torch.bincount(assign, minlength=self.num_clusters).double()
        weights = torch.where(counts > 0, counts.sum() / (self.num_clusters * counts.clamp_min(1)), 0.0)
        self.keys, self._index = keys, {k: i for i, k in enumerate(keys)}
        device = self.class_weights.device
        self.assignments = assign.to(device)
        self.class_weights.copy_(weights.float() if self.reweight else torch.ones_like(weights).float())
        self.classifier.reset_parameters()

    def on_epoch_start(self, epoch: int, dataset: Callable[[], Iterable] | None) -> None:
        if dataset is None:
            raise TrainingError("deepcluster needs a pass over the training set each epoch (Trainer dataset_pass)")
        features, keys = self.dataset_features(dataset())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (features, keys))
            features = torch.cat([f for f, _ in gathered])
            keys = [k for _, ks in gathered for k in ks]
        self.cluster(features, keys, epoch)
        counts = torch.bincount(self.assignments, minlength=self.num_clusters)
        self.nonempty_clusters = int((counts > 0).sum())

    def on_batch(self, keys: list[str]) -> None:
        try:
            index = torch.tensor([self._index[k] for k in keys], dtype=torch.long)
        except KeyError as exc:
            raise TrainingError(f"deepcluster: sample {exc.args[0]!r} was not in the epoch's clustering") from None
        self._batch_labels = self.assignments[index.to(self.assignments.device)]

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        if self._batch_labels is None:
            raise TrainingError("deepcluster: no pseudo-labels for this batch (on_batch was not called)")
        labels = self._batch_labels.to(views[0].device)
        features = self.backbone(views[0])
        logits = self.classifier(features)
        loss = self.criterion(logits, labels, self.class_weights)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return {
            "loss": loss,
            "embedding": features.detach(),
            "pseudo_label_accuracy": accuracy,
            "clusters_used": torch.tensor(float(getattr(self, "nonempty_clusters", 0))),
        }
