"""report: metrics/*.json (+ training curves, embeddings, views) -> reports/.

Writes
- ``reports/summary.md``, written by one template (``stages/templates/summary.md.j2``), and
  ``reports/summary.html``, that Markdown rendered to one self-contained page (inline CSS, figures embedded as
  base64, so it opens offline): the results table (README's, every accuracy with its bootstrap interval), each
  method against each baseline (paired bootstrap: beats / ties / trails with the difference and its interval), one
  table of every method grouped by Cookbook family (kNN, linear probe, RankMe, pretraining time and images/s), the
  origins methods beside the modern families, the baselines, the data version, and the figures;
- ``reports/summary.json``: the headline numbers with their intervals and the verdict lines, declared as DVC
  metrics (``dvc metrics show/diff``; results only, no timings, so it is content-stable);
- ``reports/figures/*.png`` (matplotlib, Agg): loss and RankMe curves per method, accuracy by method and family,
  a 2-D PCA of test embeddings coloured by class, the augmented views each method trains on;
- ``reports/curves/{loss,rankme}.tsv``: the curves, one column per method, for DVC's top-level plots;
- ``reports/model_cards/<method>.json``: the exported model card with its downstream metrics filled in.

The report holds content, plus one kind of run fact: the pretraining time and images/s, read from
``provenance/pretrain/<method>.json`` when it describes the checkpoint in runs/ (else "–"). Those are measurements of
the run that made the checkpoint, not inputs of the results, so dvc.yaml does not list them: a re-run of pretrain that
makes the same checkpoint leaves the report up to date. Commits and times are in ``provenance/`` (``sslcook trace``);
the report's own go to ``provenance/report.json``.

    python -m stages.report
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
import sys
from pathlib import Path
from typing import Any

from .workspace.common import DataError, atomic_path, read_json, run_main, workspace, write_json
from .workspace.config import load_params
from .workspace.lineage import data_version as current_data_version
from .workspace.lineage import make_record, read_provenance, sha256_file, write_provenance

REPORTS = Path("reports")
FAMILY_ORDER = (
    "deep_metric_learning",
    "self_distillation",
    "canonical_correlation_analysis",
    "masked_image_modeling",
    "origins",
)
FAMILY_TITLE = {
    "deep_metric_learning": "deep metric learning",
    "self_distillation": "self-distillation",
    "canonical_correlation_analysis": "canonical correlation analysis",
    "masked_image_modeling": "masked image modeling",
    "origins": "origins of SSL",
}
FAMILY_COLOUR = {
    "deep_metric_learning": "#1f77b4",
    "self_distillation": "#ff7f0e",
    "canonical_correlation_analysis": "#2ca02c",
    "masked_image_modeling": "#d62728",
    "origins": "#7f7f7f",
}


# ----------------------------------------------------------------------------------------------- inputs
def read_history(path: Path) -> list[dict[str, float]]:
    """runs/<method>/history.tsv as rows of floats (non-numeric cells dropped); [] when absent."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            parsed = {}
            for key, value in row.items():
                try:
                    parsed[key] = float(value)
                except (TypeError, ValueError):
                    pass
            rows.append(parsed)
    return rows


def read_projection(path: Path) -> tuple[list[float], list[float], list[int], list[str]]:
    xs, ys, labels, names = [], [], [], []
    if path.is_file():
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                xs.append(float(row["pc1"]))
                ys.append(float(row["pc2"]))
                labels.append(int(row["label"]))
                names.append(row["class"])
    return xs, ys, labels, names


def family_sorted(methods: list[str], metrics: dict[str, dict]) -> list[str]:
    def key(m: str):
        fam = metrics[m].get("family")
        return (FAMILY_ORDER.index(fam) if fam in FAMILY_ORDER else len(FAMILY_ORDER), m)

    return sorted(methods, key=key)


# ----------------------------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    histories: dict[str, list[dict]], column: str, ylabel: str, path: Path, dpi: int, families: dict[str, str]
) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    drawn = False
    for method, rows in histories.items():
        pts = [(r["epoch"], r[column]) for r in rows if "epoch" in r and column in r and math.isfinite(r[column])]
        if pts:
            ax.plot(
                *zip(*pts),
                marker="o",
                ms=3,
                label=method,
                color=FAMILY_COLOUR.get(families.get(method)),
                linestyle=["-", "--", ":", "-."][sorted(histories).index(method) % 4],
            )
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return True


def write_curve_table(histories: dict[str, list[dict]], column: str, path: Path) -> None:
    """One column per method (empty where a method has no such epoch): the table DVC's top-level plots read."""
    epochs = sorted({int(r["epoch"]) for rows in histories.values() for r in rows if "epoch" in r})
    by_method = {m: {int(r["epoch"]): r.get(column) for r in rows if "epoch" in r} for m, rows in histories.items()}
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(["epoch", *histories])
        for e in epochs:
            writer.writerow([e, *("" if by_method[m].get(e) is None else f"{by_method[m][e]:.6g}" for m in histories)])


def plot_accuracy(order: list[str], metrics: dict[str, dict], path: Path, dpi: int) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(order) + 2), 4.0))
    width = 0.38
    for i, method in enumerate(order):
        m = metrics[method]
        colour = FAMILY_COLOUR.get(m.get("family"), "grey")
        knn = m.get(knn_key(m))
        probe_primary = m.get("primary_metric") == "linear_probe_top1"
        # hatched: kNN; solid: linear probe; the thick edge marks the protocol the method is judged by;
        # error bars: the bootstrap interval over the test images
        ax.bar(
            i - width / 2,
            knn or 0,
            width,
            color=colour,
            alpha=0.55,
            edgecolor="black",
            hatch="//",
            linewidth=0.8 if probe_primary else 2.2,
            yerr=error_bar(m, knn_key(m)),
            capsize=3,
        )
        ax.bar(
            i + width / 2,
            m.get("linear_probe_top1") or 0,
            width,
            color=colour,
            edgecolor="black",
            linewidth=2.2 if probe_primary else 0.8,
            yerr=error_bar(m, "linear_probe_top1"),
            capsize=3,
        )
    baselines = collect_baselines(metrics)
    styles = {"raw pixels": ":", "random init": "--"}
    for (name, arch), b in baselines.items():
        for value, what in ((b.get("linear_probe_top1"), "probe"), (b.get(b.get("knn_key", ""), None), "kNN")):
            if value is not None:
                ax.axhline(
                    value,
                    color="black" if what == "probe" else "grey",
                    linestyle=styles[name],
                    linewidth=1,
                    label=f"{name}{f' ({arch})' if arch else ''} {what} {value:.3f}",
                )
    ax.set_xticks(
        range(len(order)),
        [f"{m}\n{FAMILY_TITLE.get(metrics[m].get('family'), '')}".replace(" ", "\n", 1) for m in order],
        fontsize=7,
    )
    ax.set_ylabel("test top-1 (left: kNN, right: linear probe)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_projections(order: list[str], projections: dict[str, tuple], path: Path, dpi: int) -> bool:
    shown = [m for m in order if projections.get(m) and projections[m][0]]
    if not shown:
        return False
    plt = _plt()
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, method in zip(axes.flat, shown):
        xs, ys, labels, names = projections[method]
        ax.set_axis_on()
        sc = ax.scatter(xs, ys, c=labels, cmap="tab10", s=5, vmin=0, vmax=max(9, max(labels)))
        ax.set_title(method, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    names_by_label = {}
    for _xs, _ys, labels, names in (projections[m] for m in shown):
        names_by_label.update(zip(labels, names))
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=sc.cmap(sc.norm(lab)), label=name)
        for lab, name in sorted(names_by_label.items())[:20]
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(10, len(handles)), fontsize=7, frameon=False)
    fig.suptitle("test embeddings, first two principal components", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return True


def _displayable(view, mean, std):
    import torch

    m = torch.as_tensor(mean, dtype=view.dtype).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=view.dtype).view(-1, 1, 1)
    img = (view * s + m).clamp(0, 1)
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def view_recipe(method: str, card: dict, channels: int) -> tuple[str, dict[str, Any], Any, Any]:
    """(recipe, build_views options, mean, std) of the views ``method`` pretrained on, from its model card."""
    augment = dict(card.get("augment") or {})
    augment.pop("out_channels", None)  # recorded by pretrain for information, not a build_views option
    spec = card.get("input") or {}
    recipe = augment.pop("recipe", None) or spec.get("recipe")
    if not recipe:
        from ssl_models import registry

        recipe = registry.get(method).cls.augment
    options = {
        "image_size": augment.pop("image_size", None) or spec.get("image_size"),
        "channels": augment.pop("channels", None) or channels,
        "grey": augment.pop("grey", spec.get("grey", "skip")),
        **augment,
    }
    return recipe, options, augment.get("mean") or spec.get("mean"), augment.get("std") or spec.get("std")


def augmented_views(method: str, recipe: str, options: dict[str, Any], images, seed: int) -> list[list] | None:
    """[image][view]: the views ``recipe`` makes of each uint8 image, drawn from ``seed``; None (and a note on
    stderr) when the recipe cannot be built for these images. The report's one call into ssl_models.augment."""
    from ssl_models.augment import build_views, view_generator

    try:
        views_of = build_views(
            recipe, **{**options, "image_size": int(options["image_size"]), "channels": int(options["channels"])}
        )
    except (TypeError, ValueError) as exc:
        print(f"report: no view grid for {method} ({exc})", file=sys.stderr)
        return None
    batches = views_of(images, view_generator(seed, 0, 0, 0))  # the parameters come from the generator alone
    return [[batch[i] for batch in batches] for i in range(len(images))]


def plot_views(method: str, card: dict, images, path: Path, dpi: int, seed: int) -> bool:
    """One row per image: the original, then each view the method's recipe makes of it."""
    recipe, options, mean, std = view_recipe(method, card, int(images.shape[1]))
    views = augmented_views(method, recipe, options, images, seed)
    if views is None:
        return False
    plt = _plt()
    n_cols = 1 + len(views[0])
    fig, axes = plt.subplots(len(images), n_cols, figsize=(1.3 * n_cols, 1.3 * len(images)), squeeze=False)
    for r, (img, row) in enumerate(zip(images, views)):
        original = img.float() / 255
        cells = [original[0].numpy() if original.shape[0] == 1 else original.permute(1, 2, 0).numpy()]
        for v in row:
            vm = mean if mean and len(mean) == v.shape[0] else [0.0] * v.shape[0]
            vs = std if std and len(std) == v.shape[0] else [1.0] * v.shape[0]
            cells.append(_displayable(v, vm, vs))
        for c, cell in enumerate(cells):
            ax = axes[r][c]
            ax.imshow(cell, cmap="gray" if cell.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("image" if c == 0 else f"view {c}", fontsize=7)
    fig.suptitle(f"{method}: {recipe} views", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------- tables
def knn_key(m: dict) -> str:
    keys = sorted((k for k in m if k.startswith("knn_top1_k")), key=lambda k: int(k.rsplit("k", 1)[1]))
    return keys[-1] if keys else "knn_top1"


def collect_baselines(metrics: dict[str, dict]) -> dict[tuple[str, str], dict]:
    """One row per (baseline, architecture): raw pixels once, random init per architecture."""
    out: dict[tuple[str, str], dict] = {}
    for m in metrics.values():
        b = m.get("baselines") or {}
        if "raw_pixels" in b:
            out.setdefault(("raw pixels", ""), {**b["raw_pixels"], "knn_key": knn_key(b["raw_pixels"])})
        if "random_init" in b:
            out.setdefault(
                ("random init", str(m.get("architecture"))), {**b["random_init"], "knn_key": knn_key(b["random_init"])}
            )
    return out


def interval(m: dict, key: str) -> dict | None:
    """The bootstrap interval {"low", "high"} of metric ``key`` in a metrics dict, None when it has none."""
    iv = (m.get("intervals") or {}).get(key)
    return iv if isinstance(iv, dict) and {"low", "high"} <= set(iv) else None


def error_bar(m: dict, key: str):
    """matplotlib's yerr ([[below], [above]]) from a metric's interval, None without one."""
    iv, value = interval(m, key), m.get(key)
    if iv is None or not isinstance(value, (int, float)):
        return None
    return [[max(0.0, value - iv["low"])], [max(0.0, iv["high"] - value)]]


def _cell(m: dict, key: str) -> str:
    """A metric with its interval when it has one: "0.930 [0.914, 0.945]"."""
    iv = interval(m, key)
    if iv is None or m.get(key) is None:
        return _fmt(m.get(key))
    return f"{_fmt(m.get(key))} [{iv['low']:.3f}, {iv['high']:.3f}]"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def method_rows(order: list[str], metrics: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    ks = sorted({int(k.rsplit("k", 1)[1]) for m in metrics.values() for k in m if k.startswith("knn_top1_k")})
    header = (
        ["family", "method", "backbone"]
        + [f"kNN top-1 k={k}" for k in ks]
        + ([f"kNN top-5 k={ks[-1]}"] if ks else [])
        + ["linear probe top-1", "RankMe", "emb std", "pretrain time", "images/s", "judged by"]
    )
    rows = []
    for method in order:
        m = metrics[method]
        pre = m.get("pretraining") or {}
        rows.append(
            [FAMILY_TITLE.get(m.get("family"), str(m.get("family"))), method, str(m.get("architecture"))]
            + [_cell(m, f"knn_top1_k{k}") for k in ks]
            + ([_fmt(m.get(f"knn_top5_k{ks[-1]}"))] if ks else [])
            + [
                _cell(m, "linear_probe_top1"),
                _fmt(m.get("rankme"), 1),
                _fmt(m.get("emb_std"), 4),
                _duration(pre.get("train_seconds")),
                _fmt(pre.get("images_per_s"), 0),
                "linear probe" if m.get("primary_metric") == "linear_probe_top1" else "kNN",
            ]
        )
    return header, rows


def baseline_rows(metrics: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    header = ["baseline", "backbone", "kNN top-1", "kNN top-5", "linear probe top-1"]
    rows = []
    for (name, arch), b in sorted(collect_baselines(metrics).items()):
        k = b["knn_key"]
        rows.append(
            [name, arch or "–", _cell(b, k), _fmt(b.get(k.replace("top1", "top5"))), _cell(b, "linear_probe_top1")]
        )
    return header, rows


BASELINE_TITLE = {"raw_pixels": "raw pixels", "random_init": "random init"}


def _metric_title(key: str) -> str:
    if key.startswith("knn_top1_k"):
        return f"kNN top-1 k={key.rsplit('k', 1)[1]}"
    return "linear probe top-1" if key == "linear_probe_top1" else key


def _baseline_title(name: str, m: dict) -> str:
    title = BASELINE_TITLE.get(name, name.replace("_", " "))
    return f"{title} ({m.get('architecture')})" if name == "random_init" else title


def _verdict_cell(c: dict) -> str:
    return f"{c['verdict']} {c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}], p {c['p_value']:.3f}"


def verdict_rows(order: list[str], metrics: dict[str, dict]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, lines): each method against each baseline on kNN top-1 at the largest k and the probe.

    "beats" only where the paired bootstrap interval of the difference is above 0, "trails" where it is below,
    "ties" where it holds 0 (``ssl_models.evaluation.paired_bootstrap``).
    """
    keys = sorted({knn_key(metrics[m]) for m in order}, key=lambda k: int(k.rsplit("k", 1)[1]) if "_k" in k else 0)
    keys = keys[-1:] + ["linear_probe_top1"]
    header = ["method", "against"] + [_metric_title(k) for k in keys]
    rows, lines = [], []
    for method in order:
        m = metrics[method]
        for name, by_metric in sorted((m.get("comparisons") or {}).items()):
            against = _baseline_title(name, m)
            cells = []
            for key in keys:
                c = by_metric.get(key)
                cells.append(_verdict_cell(c) if c else "–")
                if c:
                    lines.append(
                        f"{method} {c['verdict']} {against} on {_metric_title(key)}: "
                        f"{c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}], p = {c['p_value']:.3f}"
                    )
            rows.append([method, against] + cells)
    return header, rows, lines


def _backbone_title(m: dict, card: dict) -> str:
    config = card.get("backbone_config") or {}
    details = [
        f"width {config['width']}" if "width" in config else "",
        f"{config['depth']} blocks" if "depth" in config else "",
        f"patch {config['patch_size']}" if "patch_size" in config else "",
    ]
    details = [d for d in details if d]
    return f"{m.get('architecture')}" + (f" ({', '.join(details)})" if details else "")


def results_rows(
    order: list[str], metrics: dict[str, dict], cards: dict[str, dict]
) -> tuple[list[str], list[list[str]]]:
    """The headline table (README's "Results of the default pipeline"): methods, then the baselines, every
    accuracy with its 95% bootstrap interval."""
    ks = sorted({int(k.rsplit("k", 1)[1]) for m in metrics.values() for k in m if k.startswith("knn_top1_k")})
    header = (
        ["family", "method", "backbone"]
        + [f"kNN top-1 k={k}" for k in ks]
        + ["linear probe top-1", "RankMe", "pretrain", "images/s"]
    )
    rows = []
    for method in order:
        m = metrics[method]
        pre = m.get("pretraining") or {}
        rows.append(
            [
                FAMILY_TITLE.get(m.get("family"), str(m.get("family"))),
                method,
                _backbone_title(m, cards.get(method) or {}),
            ]
            + [_cell(m, f"knn_top1_k{k}") for k in ks]
            + [
                _cell(m, "linear_probe_top1"),
                _fmt(m.get("rankme"), 1),
                _duration(pre.get("train_seconds")),
                _fmt(pre.get("images_per_s"), 0),
            ]
        )
    # a random-init baseline has the architecture of the methods it serves: described as theirs
    titles = {str(metrics[m].get("architecture")): _backbone_title(metrics[m], cards.get(m) or {}) for m in order}
    for (name, arch), b in sorted(
        collect_baselines(metrics).items(), key=lambda kv: (kv[0][0] != "random init", kv[0])
    ):
        rows.append(
            [f"baseline: {name}", "", titles.get(arch, arch)]
            + [_cell(b, f"knn_top1_k{k}") for k in ks]
            + [_cell(b, "linear_probe_top1"), "", "", ""]
        )
    return header, rows


def origins_vs_modern_rows(order: list[str], metrics: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """The pretext tasks (family origins, by the Cookbook's category) beside the four modern families, each method
    with its gain over the random-init backbone of its architecture (same data, budget and evaluation). No rows
    unless the report holds origins methods and modern ones."""
    from ssl_models import registry

    def category(method: str) -> str:
        try:
            return str(registry.get(method).cls.category or "")
        except KeyError:
            return ""

    header = [
        "",
        "family / category",
        "method",
        "backbone",
        "kNN top-1",
        "linear probe top-1",
        "probe vs random init (paired)",
    ]
    origins = [m for m in order if metrics[m].get("family") == "origins"]
    modern = [m for m in order if metrics[m].get("family") != "origins"]
    if not origins or not modern:
        return header, []
    categories = list(registry.ORIGINS_CATEGORIES)
    origins.sort(key=lambda m: (categories.index(category(m)) if category(m) in categories else len(categories), m))
    rows = []
    for group, methods in (("origins", origins), ("modern", modern)):
        for method in methods:
            m = metrics[method]
            kind = category(method).replace("_", " ") if group == "origins" else FAMILY_TITLE.get(m.get("family"), "")
            paired = ((m.get("comparisons") or {}).get("random_init") or {}).get("linear_probe_top1")
            gain = _verdict_cell(paired) if paired else "–"
            rows.append(
                [
                    group,
                    kind,
                    method,
                    str(m.get("architecture")),
                    _fmt(m.get(knn_key(m))),
                    _fmt(m.get("linear_probe_top1")),
                    gain,
                ]
            )
    return header, rows


def table(header: list[str], rows: list[list[str]]) -> dict[str, list]:
    return {"header": header, "rows": rows}


# ----------------------------------------------------------------------------------------------- rendering
TEMPLATES = Path(__file__).parent / "templates"
CSS = """body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:right}th{background:#f3f3f3}td:nth-child(-n+3){text-align:left}
code{background:#f5f5f5;padding:0 .25em}img{max-width:100%;border:1px solid #eee;margin:.4em 0}"""


def render_markdown(context: dict[str, Any]) -> str:
    """reports/summary.md: templates/summary.md.j2 filled with ready-made cells and lines."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )
    return env.get_template("summary.md.j2").render(context)


def render_html(md_text: str, title: str, base: Path) -> str:
    """reports/summary.html: summary.md rendered by markdown-it (CommonMark + tables; raw HTML in the text is
    escaped, never passed through) as one self-contained page: inline CSS, each figure embedded as base64 from
    ``base``, so it opens offline."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def embedded_image(self, tokens, idx, options, env):
        token = tokens[idx]
        png = base64.b64encode((base / str(token.attrGet("src"))).read_bytes()).decode()
        token.attrSet("src", f"data:image/png;base64,{png}")
        return self.image(tokens, idx, options, env)

    md.add_render_rule("image", embedded_image)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}"
        f"</style></head><body>\n{md.render(md_text)}</body></html>\n"
    )


def summary_context(
    root: Path,
    order: list[str],
    metrics: dict[str, dict],
    timed: dict[str, dict],
    cards: dict[str, dict],
    figures: list[dict[str, str]],
    title: str,
) -> dict[str, Any]:
    """Everything the template shows, as text: the tables' cells, the verdict lines, the data version lines."""
    vh, vrows, verdict_lines = verdict_rows(order, metrics)
    bootstrap = next(iter(metrics.values())).get("bootstrap") or {}
    level, resamples = bootstrap.get("level") or 0.95, bootstrap.get("resamples")
    interval_note = (
        f"[low, high]: {level:.0%} bootstrap interval over the test images ({resamples} resamples, "
        f"one set shared by every method and baseline)."
        if resamples
        else ""
    )
    return {
        "title": title,
        **data_version_lines(root, metrics),
        "order": order,
        "results": table(*results_rows(order, timed, cards)),
        "interval_note": interval_note,
        "verdicts": table(vh, vrows),
        "verdict_lines": verdict_lines,
        "by_family": table(*method_rows(order, timed)),
        "knn_temperature": _fmt(next(iter(metrics.values())).get("knn_temperature"), 2),
        "origins": table(*origins_vs_modern_rows(order, metrics)),
        "baselines": table(*baseline_rows(metrics)),
        "figures": figures,
        "lineage": [lineage_line(m, metrics[m]) for m in order],
    }


def data_version_lines(root: Path, metrics: dict[str, dict]) -> dict[str, str]:
    """The data version every result was computed on ("MIXED: ..." when they differ), and a note when data.dvc
    now points to another one."""
    versions = sorted({str(m.get("data_version")) for m in metrics.values()})
    data_ver = versions[0] if len(versions) == 1 else None
    now_version = current_data_version(root)
    stale = bool(data_ver and now_version and now_version != data_ver)
    return {
        "data_line": data_ver or "MIXED: " + ", ".join(versions),
        "stale_note": f" (data.dvc now points to {now_version}: these results are stale, run `dvc repro`)"
        if stale
        else "",
    }


def lineage_line(method: str, m: dict) -> dict[str, str]:
    lin = m.get("lineage") or {}
    backbone = (lin.get("parents") or {}).get("backbone") or {}
    return {
        "method": method,
        "backbone": backbone.get("path", "?"),
        "sha256": backbone.get("sha256", "")[:16],
        "data_version": str(m.get("data_version")),
        "params_digest": str(lin.get("params_digest"))[:12],
    }


def summary_json(order: list[str], metrics: dict[str, dict], context: dict[str, Any]) -> dict[str, Any]:
    """reports/summary.json (DVC metrics): the headline numbers with their intervals, the paired comparisons and
    the verdict lines; results only, so it is content-stable."""
    methods = {}
    for m in order:
        keys = (knn_key(metrics[m]), "linear_probe_top1")
        methods[m] = {k: metrics[m].get(k) for k in ("family", *keys, "rankme", "emb_std", "primary_metric")}
        methods[m]["intervals"] = {k: iv for k in keys if (iv := interval(metrics[m], k))}
        methods[m]["comparisons"] = metrics[m].get("comparisons") or {}
    baselines = {
        f"{name}{'_' + arch if arch else ''}".replace(" ", "_"): {
            k: b.get(k) for k in (b["knn_key"], "linear_probe_top1")
        }
        for (name, arch), b in collect_baselines(metrics).items()
    }
    return {
        "data_version": context["data_line"],
        "methods": methods,
        "baselines": baselines,
        "verdicts": context["verdict_lines"],
    }


# ----------------------------------------------------------------------------------------------- stage
def read_metrics(root: Path, methods: list[str]) -> dict[str, dict]:
    metrics: dict[str, dict] = {}
    for method in methods:
        path = root / "metrics" / f"{method}.json"
        if not path.is_file():
            raise DataError(f"metrics/{method}.json: not found (run evaluate@{method} first)")
        doc = read_json(path)
        if not isinstance(doc, dict) or "lineage" not in doc:
            raise DataError(f"metrics/{method}.json: not an evaluate output (no lineage)")
        metrics[method] = doc
    return metrics


def with_run_timings(root: Path, metrics: dict[str, dict]) -> dict[str, dict]:
    """Each method's metrics plus the pretraining time and images/s of the run that made its checkpoint in runs/
    (facts of that run, from provenance/: for the tables only; the model cards and summary.json keep content)."""
    timed = {}
    for method, m in metrics.items():
        ckpt = root / "runs" / method / "checkpoint.pt"
        prov = read_provenance(root, "pretrain", method, sha256_file(ckpt) if ckpt.is_file() else None) or {}
        timings = {k: prov[k] for k in ("train_seconds", "images_per_s") if k in prov}
        timed[method] = {**m, "pretraining": {**(m.get("pretraining") or {}), **timings}}
    return timed


def read_cards(root: Path, order: list[str]) -> dict[str, dict]:
    paths = {m: root / "models" / m / "model_card.json" for m in order}
    return {m: read_json(path) if path.is_file() else {} for m, path in paths.items()}


def view_grid_images(root: Path, count: int):
    """``count`` test images spread over the test split for the view grids; None (and a note) without shards."""
    shards = root / "data" / "shards"
    if not (shards / "manifest.json").is_file():
        return None
    try:
        from ssl_models import data as shard_data

        images, _, _ = shard_data.load_split(shards, "test")
    except (ImportError, OSError, ValueError) as exc:
        print(f"report: no view grids ({str(exc).splitlines()[0] if str(exc) else exc})", file=sys.stderr)
        return None
    return images[:: max(1, len(images) // count)][:count]


def write_figures(
    fig_dir: Path,
    root: Path,
    order: list[str],
    metrics: dict[str, dict],
    cards: dict[str, dict],
    dpi: int,
    view_images,
    seed: int,
) -> list[dict[str, str]]:
    """Draw every figure into ``fig_dir``: [{"name", "caption"}] of those drawn (no curves without histories)."""
    histories = {m: read_history(root / "runs" / m / "history.tsv") for m in order}
    projections = {m: read_projection(root / "metrics" / f"{m}_pca.csv") for m in order}
    families = {m: metrics[m].get("family") for m in order}
    drawn = []
    if plot_curves(histories, "loss", "training loss", fig_dir / "loss_curves.png", dpi, families):
        drawn.append(("loss_curves.png", "Training loss per epoch"))
    if plot_curves(histories, "rankme", "RankMe (effective rank)", fig_dir / "rankme_curves.png", dpi, families):
        drawn.append(("rankme_curves.png", "RankMe of the embedding per epoch (collapse: towards 1)"))
    plot_accuracy(order, metrics, fig_dir / "accuracy.png", dpi)
    drawn.append(
        (
            "accuracy.png",
            "Test top-1 by method, coloured by family (hatched: kNN, solid: linear probe; thick "
            "edge: the protocol it is judged by; error bars: 95% bootstrap intervals), "
            "baselines as lines",
        )
    )
    if plot_projections(order, projections, fig_dir / "embeddings_pca.png", dpi):
        drawn.append(("embeddings_pca.png", "Test embeddings, 2-D PCA, coloured by class"))
    for m in order if view_images is not None else []:
        if plot_views(m, cards[m], view_images, fig_dir / f"views_{m}.png", dpi, seed):
            drawn.append((f"views_{m}.png", f"Augmented views {m} trains on"))
    return [{"name": name, "caption": caption} for name, caption in drawn]


def write_curve_tables(curves_dir: Path, root: Path, methods: list[str]) -> None:
    # methods in params order: dvc.yaml's top-level plots name the columns with ${methods}
    histories = {m: read_history(root / "runs" / m / "history.tsv") for m in methods}
    write_curve_table(histories, "loss", curves_dir / "loss.tsv")
    write_curve_table(histories, "rankme", curves_dir / "rankme.tsv")


def write_model_cards(cards_dir: Path, order: list[str], cards: dict[str, dict], metrics: dict[str, dict]) -> None:
    """Each exported model card with its downstream metrics filled in."""
    for method in order:
        if cards[method]:
            card = dict(cards[method])
            card["metrics"] = {
                **(card.get("metrics") or {}),
                "downstream": {k: v for k, v in metrics[method].items() if k != "lineage"},
            }
            (cards_dir / f"{method}.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")


def report(root: Path | None = None) -> dict[str, Any]:
    root = root or workspace()
    params = load_params(root / "params.yaml")
    cfg = params.report
    metrics = read_metrics(root, params.methods)
    order = family_sorted(list(metrics), metrics)
    cards = read_cards(root, order)
    view_images = view_grid_images(root, cfg.view_grid_images)

    out_dir = root / REPORTS
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "figures") as fig_dir:
        fig_dir.mkdir()
        figures = write_figures(fig_dir, root, order, metrics, cards, cfg.plot_dpi, view_images, params.seed)
    with atomic_path(out_dir / "curves") as curves_dir:
        curves_dir.mkdir()
        write_curve_tables(curves_dir, root, params.methods)
    with atomic_path(out_dir / "model_cards") as cards_dir:
        cards_dir.mkdir()
        write_model_cards(cards_dir, order, cards, metrics)

    context = summary_context(root, order, metrics, with_run_timings(root, metrics), cards, figures, cfg.title)
    md_text = render_markdown(context)
    with atomic_path(out_dir / "summary.md") as tmp:
        tmp.write_text(md_text)
    with atomic_path(out_dir / "summary.html") as tmp:
        tmp.write_text(render_html(md_text, cfg.title, out_dir))
    summary = summary_json(order, metrics, context)
    summary["lineage"] = make_record(
        "report",
        params={"report": cfg.model_dump(), "methods": params.methods},
        parents={f"metrics_{m}": Path("metrics") / f"{m}.json" for m in order},
        root=root,
        seed=params.seed,
    )
    write_json(out_dir / "summary.json", summary)
    write_provenance("report", REPORTS / "summary.json", root=root)
    print(f"report: {REPORTS / 'summary.md'}, {REPORTS / 'summary.html'} ({len(figures)} figures)", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    report()


if __name__ == "__main__":
    run_main(main)
