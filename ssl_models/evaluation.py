"""Downstream evaluation of frozen features: weighted kNN, a linear probe, and bootstrap intervals.

Every protocol works on features computed once (:func:`extract_features`) and kept in memory, so a method is
judged on exactly the same numbers by every protocol. Unlabelled rows (label -1) are dropped on both sides.

- kNN (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"; the protocol
  DINO reports): features are l2-normalised, a query's k most cosine-similar training images vote for their
  class with weight exp(sim / T); the class with the largest summed weight wins.
- Linear probe (the protocol of CLIP, Radford et al. 2021, appendix A.3): the optimum of an L2-regularised
  multinomial logistic regression on standardised frozen features,

      min_{W, b}  1/n sum_i -log softmax(W x_i + b)_{y_i}  +  1/(2 C n) ||W||^2

  (scikit-learn's ``C sum_i loss_i + 1/2 ||W||^2`` divided by C n; the bias is not penalised). C comes from a
  log grid, chosen by top-1 on a stratified validation split cut from train (never from test), then the
  model is refit on the whole train split at that C. Solved by L-BFGS: scikit-learn's, or a full-batch torch
  one (GPU, or feature sets too large for scikit-learn's float64 copy) that reaches the same optimum.
- Bootstrap (Efron & Tibshirani 1993): percentile intervals over the test images, and paired comparisons of two
  models on the same resampled images (one resampling shared by every metric and model, so the pairs stay paired).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .device import select_device


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated (label sets, shapes); the message is one line."""


def _progress(iterable, *, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1] (float input is passed through)."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    *,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    desc: str = "features",
    progress: bool = True,
) -> torch.Tensor:
    """Frozen features of ``images`` (N x C x H x W), in batches, eval mode, no grad -> float32 N x D on CPU.

    ``transform`` maps a uint8 batch to the float input the backbone was trained on (resize, normalise: e.g.
    :func:`ssl_models.augment.build_eval_transform`); without one, pixels are scaled to [0, 1].
    """
    device = torch.device(device) if device is not None else select_device()
    transform = transform or to_unit_float
    was_training = model.training
    model.eval().to(device)
    feature_dim = getattr(model, "feature_dim", None)
    chunks = []
    n_batches = math.ceil(len(images) / batch_size)
    try:
        for i in _progress(range(n_batches), total=n_batches, desc=desc, enabled=progress):
            batch = transform(images[i * batch_size : (i + 1) * batch_size]).to(device, non_blocking=True)
            out = model(batch)
            if out.ndim != 2 or (feature_dim is not None and out.shape[1] != feature_dim):
                raise EvaluationError(
                    f"backbone output has shape {tuple(out.shape)}, expected (batch, "
                    f"{feature_dim if feature_dim is not None else 'D'})"
                )
            chunks.append(out.float().cpu())
    finally:
        model.train(was_training)
    if not chunks:
        return torch.zeros(0, feature_dim or 0)
    return torch.cat(chunks)


def raw_pixel_features(images: torch.Tensor, *, max_side: int | None = 32) -> torch.Tensor:
    """The raw-pixel baseline: images scaled to [0, 1], shrunk to at most ``max_side`` pixels, flattened."""
    x = to_unit_float(images)
    h, w = x.shape[-2:]
    if max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        x = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
    return x.flatten(1)


def check_label_sets(
    train_labels: torch.Tensor,
    eval_labels: torch.Tensor,
    class_names: Sequence[str] | None = None,
    *,
    split: str = "test",
) -> None:
    """An evaluation split may only hold classes the training split has (kNN and the probe cannot predict others)."""
    known = set(train_labels[train_labels >= 0].tolist())
    if not known:
        raise EvaluationError(
            "the train split has no labelled images: kNN and linear probe need labels (give a labelled evaluation set)"
        )
    if not bool((eval_labels >= 0).any()):
        raise EvaluationError(
            f"the {split} split has no labelled images: kNN and linear probe accuracies need "
            f"labels (give a labelled {split} split)"
        )
    absent = sorted(set(eval_labels[eval_labels >= 0].tolist()) - known)
    if absent:
        names = [class_names[i] if class_names is not None and 0 <= i < len(class_names) else str(i) for i in absent]
        shown = ", ".join(names[:10]) + (f" (+{len(names) - 10} more)" if len(names) > 10 else "")
        raise EvaluationError(f"the {split} split has {len(absent)} class(es) absent from train: {shown}")


def labelled(features: torch.Tensor, labels: torch.Tensor, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a split that have a label (>= 0); a one-line error naming the split when none has."""
    keep = labels >= 0
    if not bool(keep.any()):
        raise EvaluationError(f"the {split} split has no labelled images: kNN and linear probe need labels")
    return features[keep], labels[keep]


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """Per row: is its label among the k highest scores (k capped at the number of classes)?"""
    ks = list(ks)
    kmax = min(max(ks), scores.shape[1])
    hit = scores.topk(kmax, dim=1).indices == labels.view(-1, 1)
    return {k: hit[:, : min(k, kmax)].any(dim=1) for k in ks}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest scores (k capped at the number of classes)."""
    ks = list(ks)
    if len(labels) == 0:
        return {k: float("nan") for k in ks}
    return {k: hit.float().mean().item() for k, hit in topk_hits(scores, labels, ks).items()}


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    k: int,
    temperature: float,
    num_classes: int,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores (N_query x C): the summed weights exp(cos / T) of each query's k nearest training features."""
    if train_features.shape[1] != query_features.shape[1]:
        raise EvaluationError(f"feature dim mismatch: train {train_features.shape[1]}, query {query_features.shape[1]}")
    train = F.normalize(train_features.float(), dim=1)
    query = F.normalize(query_features.float(), dim=1)
    k = min(k, len(train))
    out = torch.zeros(len(query), num_classes, device=query.device)
    train_labels = train_labels.to(query.device)
    for start in range(0, len(query), chunk_size):
        sim = query[start : start + chunk_size] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        out[start : start + chunk_size].scatter_add_(1, train_labels[top_idx], weights)
    return out.cpu()


def knn_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.1,
    num_classes: int | None = None,
    return_hits: bool = False,
    device: torch.device | str | None = None,
):
    """kNN top-1/top-5 for each k: {"knn_top1_k20": ..., "knn_top5_k20": ..., "knn_top1_k200": ...}.

    With ``return_hits`` also {"knn_top1_k20": bool per labelled test row, ...} (for :func:`bootstrap_intervals`).
    ``device``: where the similarities are computed (e.g. CUDA); None: the features' device.
    """
    train_features, train_labels = labelled(train_features, train_labels, "train")
    test_features, test_labels = labelled(test_features, test_labels, "test")
    if device is not None:
        train_features, test_features = train_features.to(device), test_features.to(device)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    result, hits = {}, {}
    for k in ks:
        scores = knn_scores(
            train_features, train_labels, test_features, k=k, temperature=temperature, num_classes=num_classes
        )
        hit = topk_hits(scores, test_labels, (1, 5))
        result[f"knn_top1_k{k}"] = hit[1].float().mean().item()
        result[f"knn_top5_k{k}"] = hit[5].float().mean().item()
        hits[f"knn_top1_k{k}"] = hit[1]
    return (result, hits) if return_hits else result


def stratified_split(labels: torch.Tensor, fraction: float, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, validation indices): ``fraction`` of each class (at least one when it has two or more)."""
    gen = torch.Generator().manual_seed(seed)
    fit, val = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = 0 if fraction <= 0 or len(idx) < 2 else max(1, round(fraction * len(idx)))
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    return torch.cat(fit).sort().values, torch.cat(val).sort().values


# ------------------------------------------------------------------------------------------------ linear probe
DEFAULT_C_GRID = tuple(10.0**e for e in range(-4, 3))  # 1e-4 .. 1e2, one point per decade
# "auto" backend: torch's L-BFGS above this many feature values (n x d) in the train split, scikit-learn below
AUTO_TORCH_ELEMENTS = 20_000_000

ProbeBackend = Literal["auto", "sklearn", "torch"]


class _Standardiser:
    """x -> (x - mean) / std with the statistics of the rows it was built on (constant features: std 1, as
    scikit-learn's StandardScaler, so a test pixel that train never lit cannot blow up)."""

    def __init__(self, x: torch.Tensor) -> None:
        x = x.double()
        self.mean = x.mean(0, keepdim=True)
        std = x.std(0, unbiased=False, keepdim=True)
        self.std = torch.where(std > 1e-12, std, torch.ones_like(std))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mean) / self.std


def _fit_sklearn(
    x: torch.Tensor,
    y: torch.Tensor,
    c: float,
    init: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    max_iter: int,
    tol: float,
    **_,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    clf = LogisticRegression(C=c, max_iter=max_iter, tol=tol, warm_start=init is not None)
    if init is not None:  # scikit-learn's warm start reads the previous solution from these attributes
        coef, intercept = init
        if len(coef) == 2:  # two classes: back to scikit-learn's single logit row (see below)
            coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
        clf.coef_, clf.intercept_ = coef.numpy().copy(), intercept.numpy().copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported as iterations == max_iter instead
        # one BLAS/OpenMP thread: an L-BFGS step on a few thousand rows is too small to split, and spinning
        # thread pools beside torch's made it 10x slower on a busy 2-core machine (BENCHMARKS.md)
        with threadpool_limits(1):
            clf.fit(x.numpy(), y.numpy())
    if len(clf.classes_) != int(y.max()) + 1:
        raise EvaluationError("linear probe: the fitting part lacks a class (labels must be 0..K-1)")
    coef, intercept = torch.from_numpy(clf.coef_).double(), torch.from_numpy(clf.intercept_).double()
    if coef.shape[0] == 1:  # two classes: scikit-learn fits one logit (binomial loss); as two softmax rows
        coef, intercept = torch.cat([-coef / 2, coef / 2]), torch.cat([-intercept / 2, intercept / 2])
    return coef, intercept, int(max(clf.n_iter_))


def _fit_torch(
    x: torch.Tensor,
    y: torch.Tensor,
    c: float,
    init: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    max_iter: int,
    tol: float,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Full-batch L-BFGS (strong Wolfe line search) on the same objective as scikit-learn's, on ``device``."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    x, y = x.to(device, dtype), y.to(device)
    n, d = x.shape
    k = int(y.max()) + 1
    weight = (init[0].clone() if init is not None else torch.zeros(k, d, dtype=torch.float64)).to(device, dtype)
    bias = (init[1].clone() if init is not None else torch.zeros(k, dtype=torch.float64)).to(device, dtype)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    # scipy's L-BFGS-B as scikit-learn calls it: history 10, stop when the largest gradient entry is below tol
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 2,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(x @ weight.T + bias, y) + weight.pow(2).sum() / (2 * c * n)
        loss.backward()
        return loss

    opt.step(closure)
    iterations = int(opt.state[weight].get("n_iter", 0))  # LBFGS keeps its state on the first parameter
    return weight.detach().double().cpu(), bias.detach().double().cpu(), iterations


def resolve_probe_backend(backend: ProbeBackend, n: int, d: int, device: torch.device) -> str:
    if backend != "auto":
        return backend
    return "torch" if device.type == "cuda" or n * d > AUTO_TORCH_ELEMENTS else "sklearn"


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    max_iter: int = 1000,
    tol: float = 1e-4,
    val_fraction: float = 0.1,
    backend: ProbeBackend = "auto",
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """The logistic-regression probe of the module docstring; test top-1/top-5 at the chosen C.

    C: each value of ``c_grid`` (ascending, each fit warm-started from the previous one) is fit on the train
    split minus a stratified ``val_fraction`` and scored on that validation part; the best top-1 wins (ties:
    the lower validation cross-entropy); the final fit on all of train starts from zero. Features are
    standardised with the statistics of the rows being fit.
    Returns the accuracies, the chosen ``c``, ``val_top1`` (at that C) and ``val_top1_by_c``, the backend, the
    L-BFGS iterations of the final fit, and ``hits``: top-1 correctness per labelled test row.
    """
    if train_features.shape[1] != test_features.shape[1]:
        raise EvaluationError(f"feature dim mismatch: train {train_features.shape[1]}, test {test_features.shape[1]}")
    grid = sorted(float(c) for c in c_grid)
    if not grid or any(not c > 0 for c in grid):
        raise EvaluationError(f"linear probe: the C grid needs positive values, got {list(c_grid)}")
    device = torch.device(device) if device is not None else select_device()
    train_features, train_labels = labelled(train_features, train_labels, "train")
    test_features, test_labels = labelled(test_features, test_labels, "test")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    # the solvers see classes 0..K-1 of those present in train; scores go back to all num_classes columns
    present = train_labels.unique()
    y_train = torch.searchsorted(present, train_labels)
    backend = resolve_probe_backend(backend, *train_features.shape, device)
    fit = _fit_sklearn if backend == "sklearn" else _fit_torch
    opts = {"max_iter": max_iter, "tol": tol, "device": device}

    def scores(model, x: torch.Tensor) -> torch.Tensor:
        out = torch.full((len(x), num_classes), -math.inf, dtype=torch.float64)
        out[:, present] = x @ model[0].T + model[1]
        return out

    fit_idx, val_idx = stratified_split(y_train, val_fraction, seed=seed)
    by_c: dict[float, float] = {}
    best_c = grid[0]
    if len(grid) > 1:
        if len(val_idx) == 0:
            raise EvaluationError(
                f"linear probe: choosing C among {len(grid)} values needs a validation split "
                f"(val_fraction > 0 and classes with at least 2 train images)"
            )
        scale = _Standardiser(train_features[fit_idx])
        x_fit, x_val = scale(train_features[fit_idx]), scale(train_features[val_idx])
        y_fit, y_val = y_train[fit_idx], y_train[val_idx]
        best, model = (-1.0, math.inf), None
        for c in grid:
            *model, _ = fit(x_fit, y_fit, c, model, **opts)
            val_scores = x_val @ model[0].T + model[1]
            top1 = (val_scores.argmax(1) == y_val).double().mean().item()
            loss = F.cross_entropy(val_scores, y_val).item()
            by_c[c] = top1
            if top1 > best[0] or (top1 == best[0] and loss < best[1]):
                best, best_c = (top1, loss), c
    # the final fit starts cold: its result is exactly scikit-learn's fit at best_c, whatever path chose C
    scale = _Standardiser(train_features)
    x_train = scale(train_features)
    *model, iterations = fit(x_train, y_train, best_c, None, **opts)
    test_scores = scores(model, scale(test_features))
    hits = topk_hits(test_scores, test_labels, (1, 5))
    return {
        "top1": hits[1].double().mean().item(),
        "top5": hits[5].double().mean().item(),
        "train_top1": (scores(model, x_train).argmax(1) == train_labels).double().mean().item(),
        "c": best_c,
        "val_top1": by_c.get(best_c),
        "val_top1_by_c": by_c,
        "backend": backend,
        "iterations": iterations,
        "converged": iterations < max_iter,
        "n_fit": len(fit_idx) if len(grid) > 1 else len(train_labels),
        "n_val": len(val_idx) if len(grid) > 1 else 0,
        "hits": hits[1],
    }


# ------------------------------------------------------------------------------------------------ bootstrap
def bootstrap_counts(n: int, resamples: int, seed: int) -> torch.Tensor:
    """``resamples`` x ``n``: how often each of the n test images is drawn (with replacement, n draws) in each
    resample. One matrix serves every metric and model of a split, so intervals are reproducible from the seed
    and comparisons on it are paired; a resample's accuracy is then one matrix-vector product."""
    if n < 1:
        raise EvaluationError("bootstrap: no test images to resample")
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(n, (resamples, n), generator=gen)
    return torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, n, dtype=torch.float64)
    )


def _resampled_means(hits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    hits = hits.to(torch.float64).flatten()
    if counts.shape[1] != len(hits):
        raise EvaluationError(f"bootstrap: {len(hits)} per-image results for resamples of {counts.shape[1]} images")
    return counts @ hits / len(hits)


def _percentiles(values: torch.Tensor, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2
    low, high = torch.quantile(values, torch.tensor([alpha, 1.0 - alpha], dtype=values.dtype)).tolist()
    return low, high


def bootstrap_interval(hits: torch.Tensor, counts: torch.Tensor, level: float = 0.95) -> dict[str, float]:
    """Percentile interval of the accuracy (mean of ``hits``, one 0/1 per test image): {"low", "high"}."""
    low, high = _percentiles(_resampled_means(hits, counts), level)
    return {"low": low, "high": high}


def paired_bootstrap(
    hits: torch.Tensor, reference_hits: torch.Tensor, counts: torch.Tensor, level: float = 0.95
) -> dict[str, Any]:
    """Accuracy of ``hits`` minus that of ``reference_hits`` on the same resampled images.

    Returns the observed ``difference``, its percentile interval (``low``, ``high``), a two-sided bootstrap
    ``p_value`` (twice the smaller share of resampled differences on either side of 0, with the +1 correction
    so it is never 0) and the ``verdict``: "beats" when the whole interval is above 0, "trails" when it is
    below, "ties" otherwise.
    """
    diffs = _resampled_means(hits, counts) - _resampled_means(reference_hits, counts)
    difference = (hits.double().mean() - reference_hits.double().mean()).item()
    low, high = _percentiles(diffs, level)
    b = len(diffs)
    tail = min(int((diffs <= 0).sum()), int((diffs >= 0).sum()))
    p_value = min(1.0, 2 * (tail + 1) / (b + 1))
    verdict = "beats" if low > 0 else "trails" if high < 0 else "ties"
    return {"difference": difference, "low": low, "high": high, "p_value": p_value, "verdict": verdict}


__all__ = [
    "AUTO_TORCH_ELEMENTS",
    "DEFAULT_C_GRID",
    "EvaluationError",
    "bootstrap_counts",
    "bootstrap_interval",
    "check_label_sets",
    "extract_features",
    "knn_evaluate",
    "knn_scores",
    "labelled",
    "linear_probe",
    "paired_bootstrap",
    "raw_pixel_features",
    "resolve_probe_backend",
    "stratified_split",
    "to_unit_float",
    "topk_accuracy",
    "topk_hits",
]
