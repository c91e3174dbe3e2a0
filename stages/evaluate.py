"""evaluate@<method>: exported backbone + labelled shards -> metrics/<method>.json (+ a 2-D PCA of test embeddings).

Frozen features of the train and test splits are computed once and shared by every protocol:
weighted kNN (top-1/top-5 at each k of params), a linear probe (logistic regression at the C chosen on a
validation split cut from train), RankMe and the embedding std of the test features. Two baselines put the
numbers in context: a randomly initialised backbone of the same architecture and raw pixels (kNN and the same
probe). They depend only on the data, the architecture and the evaluation params, so they are computed once per
(data, architecture, params) and cached in ``.cache/baselines/`` under a digest of exactly those inputs, with
their per-test-image hits: the four methods of a run share them, and a new data version or architecture gets
fresh ones. (A separate DVC stage cannot do this: which architectures exist is decided per method by params, not
known to dvc.yaml.)

Every headline accuracy (kNN top-1 at each k, probe top-1) gets a bootstrap interval over the test images
(``intervals``), for the method and each baseline; ``comparisons`` holds the paired bootstrap of the method
against each baseline (difference, interval, p-value, verdict beats / ties / trails), all on one set of resampled
indices drawn from ``seed``. The point values stay top-level keys, so ``dvc metrics diff`` compares them.
Unlabelled test images are dropped (``n_test_unlabelled`` counts them).

Masked image modeling methods are judged by the linear probe (kNN is structurally low for MAE features);
the others by kNN top-1 at the largest k: ``primary_metric`` names which.

metrics/<method>.json holds results only (the report and `dvc metrics diff` read it, and the report stage hashes
metrics/), so a re-run on the same backbone and shards writes the same bytes. The evaluation's duration, time and
commit go to provenance/evaluate/<method>.json.

    python -m stages.evaluate --method simclr
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .workspace.common import ConfigError, DataError, atomic_path, read_json, run_main, workspace, write_json
from .workspace.config import load_params
from .workspace.lineage import data_version as current_data_version
from .workspace.lineage import digest, make_record, write_provenance

SHARDS_DIR = Path("data") / "shards"
BASELINE_CACHE = Path(".cache") / "baselines"
MIM_FAMILY = "masked_image_modeling"


def backbone_path(method: str) -> Path:
    return Path("models") / method / "backbone.safetensors"


def metrics_path(method: str) -> Path:
    return Path("metrics") / f"{method}.json"


def projection_path(method: str) -> Path:
    return Path("metrics") / f"{method}_pca.csv"


def rounded(value: Any, digits: int = 6) -> Any:
    """Metrics rounded for people and diffs (float32 accuracies print as 0.25999999046325684 otherwise)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    return value


def primary_metric(family: str, ks: list[int]) -> str:
    return "linear_probe_top1" if family == MIM_FAMILY else f"knn_top1_k{max(ks)}"


def pick_device(choice: str):
    from ssl_models.device import DeviceError, select_device

    try:
        return select_device(choice)
    except DeviceError as exc:
        raise ConfigError(f"params.yaml: evaluate.device: {exc}") from None


@dataclass
class Splits:
    """The labelled train and test images of verified shards (unlabelled test images dropped and counted)."""

    train_x: Any
    train_y: Any
    test_x: Any
    test_y: Any
    classes: list[str]
    manifest: dict[str, Any]
    n_test_unlabelled: int


def labelled_splits(root: Path) -> Splits:
    from ssl_models import data as shard_data
    from ssl_models.evaluation import EvaluationError, check_label_sets

    shards = root / SHARDS_DIR
    if not (shards / "manifest.json").is_file():
        raise DataError(f"{SHARDS_DIR / 'manifest.json'}: not found (run the shard stage first)")
    manifest = read_json(shards / "manifest.json")
    for split in ("train", "test"):
        if split not in (manifest.get("splits") or {}):
            raise DataError(
                f"{SHARDS_DIR / 'manifest.json'}: no {split!r} split (evaluation needs labelled train and test splits)"
            )
    try:
        shard_data.verify_shards(shards)
        train_x, train_y, classes = shard_data.load_split(shards, "train")
        test_x, test_y, _ = shard_data.load_split(shards, "test")
    except (OSError, ValueError) as exc:  # the loader's errors are ValueErrors with one line naming the shard
        raise DataError(str(exc).splitlines()[0]) from None
    try:
        check_label_sets(train_y, test_y, classes, split="test")
    except EvaluationError as exc:
        raise DataError(f"{SHARDS_DIR}: {exc}") from None
    keep = test_y >= 0  # unlabelled test images cannot be scored: dropped, and counted in the metrics
    return Splits(train_x, train_y, test_x[keep], test_y[keep], list(classes), manifest, int((~keep).sum()))


@dataclass
class Evaluation:
    """What every protocol of one evaluation shares: the backbone under test, the splits, its input transform and
    the evaluation settings. Random-init and raw-pixel baselines are scored with the same features/scores steps."""

    method: str
    weights: Path  # relative to the workspace, for messages and lineage
    model: Any
    splits: Splits
    transform: Any
    cfg: Any
    seed: int
    device: Any

    def features(self, net, name: str):
        """(train features, test features) of ``net`` on the splits, through the backbone's input transform."""
        from ssl_models.evaluation import EvaluationError, extract_features

        try:
            return tuple(
                extract_features(
                    net,
                    x,
                    transform=self.transform,
                    batch_size=self.cfg.batch_size,
                    device=self.device,
                    desc=f"{name} {split} features",
                )
                for split, x in (("train", self.splits.train_x), ("test", self.splits.test_x))
            )
        except EvaluationError as exc:
            raise DataError(f"{self.weights}: {exc}") from None

    def scores(self, train_f, test_f) -> tuple[dict[str, Any], dict[str, Any]]:
        return evaluate_features(
            train_f,
            self.splits.train_y,
            test_f,
            self.splits.test_y,
            num_classes=len(self.splits.classes),
            cfg=self.cfg,
            seed=self.seed,
            device=self.device,
        )


def read_backbone(root: Path, method: str):
    """(backbone, its input spec) from models/<method>/backbone.safetensors."""
    from ssl_models.io import BackboneFileError, load_backbone

    weights = backbone_path(method)
    try:
        model = load_backbone(root / weights)
    except BackboneFileError as exc:
        raise DataError(str(exc)) from None
    spec = model.export_header.get("input") or {}
    if not spec.get("image_size"):
        raise DataError(f"{weights}: the header has no input.image_size (re-export the backbone)")
    return model, spec


def eval_transform(spec: dict[str, Any], model, splits: Splits, weights: Path):
    """The deterministic input transform of the backbone (resize + normalise), checked against the images."""
    from ssl_models.augment import build_eval_transform

    try:
        transform = build_eval_transform(
            image_size=int(spec["image_size"]),
            channels=int(splits.train_x.shape[1]),
            grey=spec.get("grey", "skip"),
            mean=spec.get("mean"),
            std=spec.get("std"),
        )
    except ValueError as exc:
        raise DataError(f"{weights}: input spec does not fit the data ({exc})") from None
    if transform.out_channels != model.config.get("in_chans", transform.out_channels):
        raise DataError(
            f"{SHARDS_DIR}: images give {transform.out_channels} channel(s), the backbone in {weights} "
            f"expects {model.config.get('in_chans')}"
        )
    return transform


def headline_names(ks: list[int]) -> list[str]:
    """The accuracies that get intervals and paired comparisons: kNN top-1 at each k, probe top-1."""
    return [f"knn_top1_k{k}" for k in ks] + ["linear_probe_top1"]


def evaluate_features(
    train_f, train_y, test_f, test_y, *, num_classes: int, cfg, seed: int, device
) -> tuple[dict[str, Any], dict[str, Any]]:
    """kNN at every k and the linear probe on one set of cached features -> (metrics, per-test-image top-1 hits
    of each headline accuracy)."""
    from ssl_models.evaluation import knn_evaluate, linear_probe

    knn, hits = knn_evaluate(
        train_f,
        train_y,
        test_f,
        test_y,
        ks=cfg.knn_k,
        temperature=cfg.knn_temperature,
        num_classes=num_classes,
        return_hits=True,
        device=device,
    )
    out: dict[str, Any] = dict(knn)
    lp = cfg.linear_probe
    probe = linear_probe(
        train_f,
        train_y,
        test_f,
        test_y,
        num_classes=num_classes,
        c_grid=lp.c_grid,
        max_iter=lp.max_iter,
        val_fraction=lp.val_fraction,
        backend=lp.backend,
        seed=seed,
        device=device,
    )
    out["linear_probe_top1"] = probe["top1"]
    out["linear_probe_top5"] = probe["top5"]
    out["linear_probe"] = {
        k: probe[k] for k in ("c", "val_top1", "train_top1", "backend", "iterations", "converged", "n_fit", "n_val")
    }
    out["linear_probe"]["val_top1_by_c"] = {f"{c:g}": v for c, v in probe["val_top1_by_c"].items()}
    hits["linear_probe_top1"] = probe["hits"]
    return out, hits


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """A baseline's accuracies and its probe's chosen C (its other diagnostics would only widen `dvc metrics show`)."""
    out = {k: v for k, v in result.items() if k.startswith(("knn_top", "linear_probe_top"))}
    out["linear_probe_c"] = result["linear_probe"]["c"]
    return out


def with_intervals(metrics: dict[str, Any], hits: dict[str, Any], counts, level: float) -> dict[str, Any]:
    """``metrics`` plus ``intervals``: {headline name: {"low", "high"}} from the shared bootstrap resamples."""
    from ssl_models.evaluation import bootstrap_interval

    return {**metrics, "intervals": {name: bootstrap_interval(h, counts, level) for name, h in hits.items()}}


# per-test-image hits are stored as strings of 0/1 (one character per test image, in test order)
def encode_hits(hits: dict[str, Any]) -> dict[str, str]:
    return {name: "".join("1" if v else "0" for v in h.tolist()) for name, h in hits.items()}


def decode_hits(encoded: Any, names: list[str], n: int) -> dict[str, Any] | None:
    """The cached hits, or None when they do not cover exactly these metrics and ``n`` test images."""
    import torch

    if not isinstance(encoded, dict) or sorted(encoded) != sorted(names):
        return None
    if any(not isinstance(v, str) or len(v) != n or set(v) - {"0", "1"} for v in encoded.values()):
        return None
    return {name: torch.tensor([c == "1" for c in encoded[name]]) for name in names}


BASELINE_CACHE_FORMAT = 2  # 2: per-test-image hits beside the metrics (1 had metrics only: recomputed)


def cached(
    root: Path,
    kind: str,
    key: dict[str, Any],
    names: list[str],
    n_test: int,
    compute: Callable[[], tuple[dict[str, Any], dict[str, Any]]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, hits) cached under ``key``, or computed and stored (atomically; concurrent writers are harmless).

    An entry of another format, another key or with hits that do not fit this test split is recomputed.
    """
    key = {**key, "format": BASELINE_CACHE_FORMAT}
    path = root / BASELINE_CACHE / f"{kind}-{digest(key)[:20]}.json"
    if path.is_file():
        try:
            doc = read_json(path)
            hits = decode_hits(doc.get("hits"), names, n_test) if isinstance(doc, dict) else None
            if hits is not None and doc.get("key") == key and isinstance(doc.get("metrics"), dict):
                print(f"evaluate: {kind} baseline from {path.relative_to(root)}", file=sys.stderr)
                return doc["metrics"], hits
        except DataError:
            pass  # a damaged cache entry is recomputed
    metrics, hits = compute()
    write_json(path, {"key": key, "metrics": metrics, "hits": encode_hits(hits)})
    return metrics, hits


def pca_2d(features, labels, n_points: int, seed: int):
    """A deterministic sample of at most ``n_points`` rows projected on their first two principal components."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(features), generator=gen)[:n_points].sort().values
    x = features[idx].double()
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    proj = x @ vh[:2].T if vh.shape[0] >= 2 else torch.cat([x @ vh[:1].T, torch.zeros(len(x), 1)], 1)
    # fix the sign of each component so reruns and methods are comparable at a glance
    signs = torch.sign(proj.sum(0) + 1e-12)
    return (proj * signs).float(), labels[idx]


def method_metrics(ev: Evaluation, root: Path, counts, family: str) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(result, per-test-image hits, test features): every protocol on the backbone's frozen features."""
    from ssl_models.monitors import embedding_std, healthy_std, rankme

    cfg, splits, model = ev.cfg, ev.splits, ev.model
    train_f, test_f = ev.features(model, ev.method)
    metrics, hits = ev.scores(train_f, test_f)
    result: dict[str, Any] = {
        "method": ev.method,
        "family": family,
        "architecture": model.config.get("name"),
        "feature_dim": model.feature_dim,
        **with_intervals(metrics, hits, counts, cfg.bootstrap.level),
        "bootstrap": {"resamples": cfg.bootstrap.resamples, "level": cfg.bootstrap.level, "seed": ev.seed},
        "knn_temperature": cfg.knn_temperature,
        "rankme": rankme(test_f),
        "emb_std": embedding_std(test_f),
        "emb_std_healthy": healthy_std(model.feature_dim),
        "primary_metric": primary_metric(family, cfg.knn_k),
        "num_classes": len(splits.classes),
        "n_train": int((splits.train_y >= 0).sum()),
        "n_test": len(splits.test_y),
        "n_test_unlabelled": splits.n_test_unlabelled,
        "data_version": splits.manifest.get("data_version") or current_data_version(root),
        "pretraining": pretraining_summary(root / ev.weights.parent / "model_card.json"),
    }
    return result, hits, test_f


def pretraining_summary(card_path: Path) -> dict[str, Any]:
    """The numbers of the model card's training summary (epochs, final loss, ...); {} without a card."""
    card = read_json(card_path) if card_path.is_file() else {}
    summary = (card.get("training") or {}).get("summary") or {}
    return {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def baseline_metrics(
    ev: Evaluation, root: Path, spec: dict[str, Any], data_version: str, hits: dict[str, Any], counts
) -> dict[str, Any]:
    """``baselines`` (random init of the same architecture, raw pixels: cached, with intervals) and
    ``comparisons`` (the method against each, paired on the same resampled test images)."""
    import torch

    from ssl_models.evaluation import paired_bootstrap, raw_pixel_features

    cfg, level, names = ev.cfg, ev.cfg.bootstrap.level, headline_names(ev.cfg.knn_k)
    # the bootstrap settings change intervals, not a baseline's predictions: not part of the cache key
    eval_key = cfg.model_dump(exclude={"device", "projection_points", "baselines", "batch_size", "bootstrap"})
    key = {
        "data_version": data_version,
        "splits": digest(ev.splits.manifest.get("splits")),
        "eval": eval_key,
        "seed": ev.seed,
    }

    def random_init():
        from ssl_models.backbones import build_backbone

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ev.seed)
            net = build_backbone(**ev.model.config)
        metrics, b_hits = ev.scores(*ev.features(net, "random-init"))
        return headline(metrics), b_hits

    def raw_pixels():
        metrics, b_hits = ev.scores(
            *(raw_pixel_features(x, max_side=cfg.raw_pixels_max_side) for x in (ev.splits.train_x, ev.splits.test_x))
        )
        return headline(metrics), b_hits

    n_test = len(ev.splits.test_y)
    baselines = {
        "random_init": cached(
            root, "random_init", {**key, "backbone_config": ev.model.config, "input": spec}, names, n_test, random_init
        ),
        "raw_pixels": cached(root, "raw_pixels", key, names, n_test, raw_pixels),
    }
    return {
        "baselines": {
            name: with_intervals(b_metrics, b_hits, counts, level) for name, (b_metrics, b_hits) in baselines.items()
        },
        "comparisons": {
            name: {m: paired_bootstrap(hits[m], b_hits[m], counts, level) for m in names}
            for name, (_, b_hits) in baselines.items()
        },
    }


def write_projection(path: Path, projection, classes: list[str]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["pc1", "pc2", "label", "class"])
            for (a, b), y in zip(projection[0].tolist(), projection[1].tolist()):
                writer.writerow([f"{a:.6g}", f"{b:.6g}", y, classes[y]])


def evaluate(method: str, root: Path | None = None) -> dict[str, Any]:
    from ssl_models.evaluation import bootstrap_counts

    started = time.time()
    root = root or workspace()
    params = load_params(root / "params.yaml")
    cfg = params.evaluate
    if method not in params.methods:
        raise ConfigError(f"params.yaml: methods: {method!r} is not listed (listed: {', '.join(params.methods)})")
    device = pick_device(cfg.device)
    weights = backbone_path(method)
    model, spec = read_backbone(root, method)
    family = model.export_header.get("family") or "unknown"
    splits = labelled_splits(root)
    ev = Evaluation(
        method, weights, model, splits, eval_transform(spec, model, splits, weights), cfg, params.seed, device
    )

    counts = bootstrap_counts(len(splits.test_y), cfg.bootstrap.resamples, params.seed)
    result, hits, test_f = method_metrics(ev, root, counts, family)
    if cfg.baselines:
        result.update(baseline_metrics(ev, root, spec, result["data_version"], hits, counts))
    projection = pca_2d(test_f, splits.test_y, cfg.projection_points, params.seed) if cfg.projection_points else None
    eval_seconds = round(time.time() - started, 2)
    for key, value in result.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"{weights}: {key} is {value} (non-finite features?)")

    if projection is not None:
        write_projection(root / projection_path(method), projection, splits.classes)
    lineage = make_record(
        "evaluate",
        params={"seed": params.seed, "evaluate": cfg.model_dump()},
        root=root,
        seed=params.seed,
        parents={"backbone": weights, "shards": SHARDS_DIR / "manifest.json"},
        extra={"method": method, "family": family},
    )
    result = {**rounded(result), "lineage": lineage}
    write_json(root / metrics_path(method), result)
    write_provenance("evaluate", metrics_path(method), method=method, root=root, extra={"seconds": eval_seconds})
    shown = result[result["primary_metric"]]
    print(
        f"evaluate {method}: {result['primary_metric']} {shown:.4f}, linear probe {result['linear_probe_top1']:.4f}, "
        f"rankme {result['rankme']:.1f}",
        file=sys.stderr,
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, help="a method listed in params.yaml methods")
    args = parser.parse_args(argv)
    evaluate(args.method)


if __name__ == "__main__":
    run_main(main)
