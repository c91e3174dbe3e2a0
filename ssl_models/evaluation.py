"""Downstream evaluation of frozen features: weighted kNN and a linear probe.

Both protocols work on features computed once (:func:`extract_features`) and kept in memory, so a method is
judged on exactly the same numbers by every protocol.

- kNN (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"; the protocol
  DINO reports): features are l2-normalised, a query's k most cosine-similar training images vote for their
  class with weight exp(sim / T); the class with the largest summed weight wins.
- Linear probe: a single linear layer on standardised frozen features, trained with AdamW and a cosine
  schedule; early stopping on a validation split cut (stratified) from the training features, never from test.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated (label sets, shapes); the message is one line."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _progress(iterable, *, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1] (float input is passed through)."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, *,
                     transform: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 512,
                     device: torch.device | str | None = None, desc: str = "features",
                     progress: bool = True) -> torch.Tensor:
    """Frozen features of ``images`` (N x C x H x W), in batches, eval mode, no grad -> float32 N x D on CPU.

    ``transform`` maps a uint8 batch to the float input the backbone was trained on (resize, normalise: e.g.
    :func:`ssl_models.augment.build_eval_transform`); without one, pixels are scaled to [0, 1].
    """
    device = torch.device(device) if device is not None else default_device()
    transform = transform or to_unit_float
    was_training = model.training
    model.eval().to(device)
    feature_dim = getattr(model, "feature_dim", None)
    chunks = []
    n_batches = math.ceil(len(images) / batch_size)
    try:
        for i in _progress(range(n_batches), total=n_batches, desc=desc, enabled=progress):
            batch = transform(images[i * batch_size:(i + 1) * batch_size]).to(device, non_blocking=True)
            out = model(batch)
            if out.ndim != 2 or (feature_dim is not None and out.shape[1] != feature_dim):
                raise EvaluationError(f"backbone output has shape {tuple(out.shape)}, expected (batch, "
                                      f"{feature_dim if feature_dim is not None else 'D'})")
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


def check_label_sets(train_labels: torch.Tensor, eval_labels: torch.Tensor, class_names: Sequence[str] | None = None,
                     *, split: str = "test") -> None:
    """An evaluation split may only hold classes the training split has (kNN and the probe cannot predict others)."""
    known = set(train_labels[train_labels >= 0].tolist())
    if not known:
        raise EvaluationError("the train split has no labelled images: kNN and linear probe need labels "
                              "(give a labelled evaluation set)")
    absent = sorted(set(eval_labels[eval_labels >= 0].tolist()) - known)
    if absent:
        names = [class_names[i] if class_names is not None and 0 <= i < len(class_names) else str(i) for i in absent]
        shown = ", ".join(names[:10]) + (f" (+{len(names) - 10} more)" if len(names) > 10 else "")
        raise EvaluationError(f"the {split} split has {len(absent)} class(es) absent from train: {shown}")


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest scores (k capped at the number of classes)."""
    ks = list(ks)
    if len(labels) == 0:
        return {k: float("nan") for k in ks}
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices
    hit = top == labels.view(-1, 1)
    return {k: hit[:, :min(k, kmax)].any(dim=1).float().mean().item() for k in ks}


@torch.no_grad()
def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor, *, k: int,
               temperature: float, num_classes: int, chunk_size: int = 1024) -> torch.Tensor:
    """Class scores (N_query x C): the summed weights exp(cos / T) of each query's k nearest training features."""
    if train_features.shape[1] != query_features.shape[1]:
        raise EvaluationError(f"feature dim mismatch: train {train_features.shape[1]}, query {query_features.shape[1]}")
    train = F.normalize(train_features.float(), dim=1)
    query = F.normalize(query_features.float(), dim=1)
    k = min(k, len(train))
    out = torch.zeros(len(query), num_classes, device=query.device)
    train_labels = train_labels.to(query.device)
    for start in range(0, len(query), chunk_size):
        sim = query[start:start + chunk_size] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        out[start:start + chunk_size].scatter_add_(1, train_labels[top_idx], weights)
    return out.cpu()


def knn_evaluate(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, *, ks: Sequence[int] = (20, 200), temperature: float = 0.1,
                 num_classes: int | None = None, device: torch.device | str | None = None) -> dict[str, float]:
    """kNN top-1/top-5 for each k: {"knn_top1_k20": ..., "knn_top5_k20": ..., "knn_top1_k200": ...}.

    ``device``: where the similarities are computed (e.g. CUDA); None: the features' device.
    """
    keep = train_labels >= 0
    train_features, train_labels = train_features[keep], train_labels[keep]
    if device is not None:
        train_features, test_features = train_features.to(device), test_features.to(device)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    result = {}
    for k in ks:
        scores = knn_scores(train_features, train_labels, test_features, k=k, temperature=temperature,
                            num_classes=num_classes)
        acc = topk_accuracy(scores, test_labels, (1, 5))
        result[f"knn_top1_k{k}"] = acc[1]
        result[f"knn_top5_k{k}"] = acc[5]
    return result


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


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, *, num_classes: int | None = None, epochs: int = 100, lr: float = 1e-3,
                 weight_decay: float = 1e-4, batch_size: int = 0, val_fraction: float = 0.1, patience: int = 10,
                 seed: int = 0, device: torch.device | str | None = None, progress: bool = False) -> dict[str, Any]:
    """Train a linear classifier on frozen features; return test top-1/top-5 of the best-on-validation epoch.

    ``batch_size`` 0 trains full-batch. Features are standardised with the statistics of the fitting part.
    With ``val_fraction`` 0 there is no early stopping and the last epoch is kept.
    """
    if train_features.shape[1] != test_features.shape[1]:
        raise EvaluationError(f"feature dim mismatch: train {train_features.shape[1]}, test {test_features.shape[1]}")
    device = torch.device(device) if device is not None else default_device()
    keep = train_labels >= 0
    train_features, train_labels = train_features[keep].float(), train_labels[keep]
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    fit_idx, val_idx = stratified_split(train_labels, val_fraction, seed=seed)
    x_fit, y_fit = train_features[fit_idx], train_labels[fit_idx]
    mean, std = x_fit.mean(0, keepdim=True), x_fit.std(0, keepdim=True).clamp_min(1e-6)

    def standardise(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - mean) / std).to(device)

    x_fit, y_fit = standardise(x_fit), y_fit.to(device)
    x_val, y_val = standardise(train_features[val_idx]), train_labels[val_idx].to(device)
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(x_fit.shape[1], num_classes)
    nn.init.normal_(head.weight, std=0.01, generator=gen)
    nn.init.zeros_(head.bias)
    head.to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    bs = batch_size if batch_size and batch_size < len(x_fit) else len(x_fit)

    best = {"val_top1": -1.0, "val_loss": math.inf, "epoch": 0, "state": None}
    epochs_run, since_best = 0, 0
    for epoch in _progress(range(1, epochs + 1), total=epochs, desc="linear probe", enabled=progress):
        head.train()
        order = torch.randperm(len(x_fit), generator=gen).to(device) if bs < len(x_fit) else None
        for start in range(0, len(x_fit), bs):
            sel = order[start:start + bs] if order is not None else slice(None)
            loss = F.cross_entropy(head(x_fit[sel]), y_fit[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        epochs_run = epoch
        if len(x_val) == 0:
            continue
        head.eval()
        with torch.no_grad():
            logits = head(x_val)
            val_loss = F.cross_entropy(logits, y_val).item()
            val_top1 = (logits.argmax(1) == y_val).float().mean().item()
        if val_top1 > best["val_top1"] or (val_top1 == best["val_top1"] and val_loss < best["val_loss"]):
            best = {"val_top1": val_top1, "val_loss": val_loss, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in head.state_dict().items()}}
            since_best = 0
        else:
            since_best += 1
            if patience and since_best >= patience:
                break
    if best["state"] is not None:
        head.load_state_dict(best["state"])
    head.eval()
    with torch.no_grad():
        test_scores = head(standardise(test_features)).cpu()
        fit_top1 = (head(x_fit).argmax(1) == y_fit).float().mean().item()
    acc = topk_accuracy(test_scores, test_labels, (1, 5))
    return {"top1": acc[1], "top5": acc[5], "train_top1": fit_top1,
            "val_top1": best["val_top1"] if best["state"] is not None else None,
            "best_epoch": best["epoch"] if best["state"] is not None else epochs_run, "epochs_run": epochs_run,
            "n_fit": len(x_fit), "n_val": len(x_val)}


__all__ = ["EvaluationError", "check_label_sets", "default_device", "extract_features", "knn_evaluate", "knn_scores",
           "linear_probe", "raw_pixel_features", "stratified_split", "to_unit_float", "topk_accuracy"]
