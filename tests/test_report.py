"""export, evaluate and report on a tiny real pipeline (dvc repro), plus the report's rendering and bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import support.tiny_pipeline as tp


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> dict:
    """A workspace after `sslcook data ingest` + `dvc repro` + `git commit` of the tiny pipeline (read-only)."""
    return tp.shared_pipeline(tmp_path_factory)


def copy_workspace(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


def test_pipeline_writes_metrics_backbone_and_report(pipeline):
    ws = pipeline["ws"]
    data_version = tp.yaml.safe_load((ws / "data.dvc").read_text())["outs"][0]["md5"]

    metrics = json.loads((ws / "metrics" / "simclr.json").read_text())
    for key in (
        "knn_top1_k20",
        "knn_top5_k20",
        "knn_top1_k200",
        "knn_top5_k200",
        "linear_probe_top1",
        "rankme",
        "emb_std",
    ):
        assert isinstance(metrics[key], float), key
    assert 0.0 <= metrics["knn_top1_k200"] <= metrics["knn_top5_k200"] <= 1.0
    assert metrics["primary_metric"] == "knn_top1_k200" and metrics["family"] == "deep_metric_learning"
    assert metrics["n_train"] == 100 and metrics["n_test"] == 30
    assert metrics["data_version"] == data_version == metrics["lineage"]["data_version"]
    for baseline in ("random_init", "raw_pixels"):
        assert 0.0 <= metrics["baselines"][baseline]["linear_probe_top1"] <= 1.0
        assert "knn_top1_k200" in metrics["baselines"][baseline]
    assert metrics["lineage"]["parents"]["backbone"]["path"] == "models/simclr/backbone.safetensors"
    # the probe's chosen C, bootstrap intervals beside every headline point value, paired comparisons
    assert (
        metrics["linear_probe"]["c"]
        in tp.yaml.safe_load((ws / "params.yaml").read_text())["evaluate"]["linear_probe"]["c_grid"]
    )
    assert metrics["n_test_unlabelled"] == 0 and metrics["bootstrap"]["resamples"] >= 1000
    for key in ("knn_top1_k20", "knn_top1_k200", "linear_probe_top1"):
        iv = metrics["intervals"][key]
        assert iv["low"] <= metrics[key] <= iv["high"], key
        for baseline in ("random_init", "raw_pixels"):
            b = metrics["baselines"][baseline]
            assert b["intervals"][key]["low"] <= b[key] <= b["intervals"][key]["high"]
            c = metrics["comparisons"][baseline][key]
            assert c["difference"] == pytest.approx(metrics[key] - b[key], abs=2e-6)
            assert c["verdict"] == ("beats" if c["low"] > 0 else "trails" if c["high"] < 0 else "ties")
    # baselines are cached per data version + architecture, outside the DVC outputs
    assert len(list((ws / ".cache" / "baselines").glob("*.json"))) == 2

    # the export holds no pickle: safetensors weights and JSON only
    assert sorted(p.name for p in (ws / "models" / "simclr").iterdir()) == ["backbone.safetensors", "model_card.json"]
    card = json.loads((ws / "models" / "simclr" / "model_card.json").read_text())
    assert card["backbone_config"]["width"] == 4 and card["feature_dim"] == 32
    assert card["input"]["image_size"] == 28 and card["input"]["channels"] == 1 and len(card["input"]["mean"]) == 1
    assert card["training"]["summary"]["epochs"] == 1 and card["method"] == "simclr"
    assert card["lineage"]["ancestors"]["checkpoint"]["stage"] == "pretrain"

    reports = ws / "reports"
    md = (reports / "summary.md").read_text()
    assert data_version in md and "deep metric learning" in md and "| simclr |" in md
    assert f"{metrics['knn_top1_k200']:.3f}" in md and "raw pixels" in md and "random init" in md
    for png in ("loss_curves.png", "rankme_curves.png", "accuracy.png", "embeddings_pca.png", "views_simclr.png"):
        assert (reports / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"figures/{png}" in md
    page = (reports / "summary.html").read_text()
    assert page.count("data:image/png;base64,") == 5
    assert "http://" not in page and "https://" not in page  # opens offline
    assert (
        json.loads((reports / "model_cards" / "simclr.json").read_text())["metrics"]["downstream"]["linear_probe_top1"]
        == metrics["linear_probe_top1"]
    )
    assert (reports / "curves" / "loss.tsv").read_text().splitlines()[0] == "epoch\tsimclr"

    shown = json.loads(tp.dvc(["metrics", "show", "--json"], ws).stdout)
    files = next(iter(shown.values()))["data"]
    assert files["metrics/simclr.json"]["data"]["knn_top1_k200"] == metrics["knn_top1_k200"]
    assert files["metrics/simclr.json"]["data"]["intervals"]["knn_top1_k200"] == metrics["intervals"]["knn_top1_k200"]
    summary = json.loads((reports / "summary.json").read_text())
    assert len(summary["verdicts"]) == 4 and all(
        " raw pixels " in v or " random init " in v for v in summary["verdicts"]
    )
    assert (
        files["reports/summary.json"]["data"]["methods"]["simclr"]["linear_probe_top1"] == metrics["linear_probe_top1"]
    )
    plots = json.loads(tp.dvc(["plots", "show", "--json"], ws).stdout)
    assert {"training_loss", "rankme", "metrics/simclr_pca.csv"} <= set(plots["data"])
    assert not plots.get("errors")
    assert json.loads(tp.dvc(["status", "--json"], ws).stdout or "{}") == {}


def test_exported_backbone_gives_the_checkpoint_features(pipeline):
    from ssl_models.backbones import build_backbone
    from ssl_models.io import load_backbone

    ws = pipeline["ws"]
    ckpt = torch.load(ws / "runs" / "simclr" / "checkpoint.pt", map_location="cpu", weights_only=True)
    reference = build_backbone(**ckpt["backbone_config"])
    reference.load_state_dict(ckpt["backbone_state"])
    exported = load_backbone(ws / "models" / "simclr" / "backbone.safetensors")
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(reference.eval()(x), exported(x), atol=1e-6, rtol=0)


def test_export_without_a_recorded_size_takes_the_shards_image_size(pipeline, tmp_path):
    """A checkpoint that records no input size (none in augment, config.json or backbone_config) is exported at
    the size the shard manifest gives its images; without shards that is a one-line error."""
    from stages.export import input_spec, load_checkpoint
    from stages.workspace.common import DataError, manifest_image_size

    ws = pipeline["ws"]
    ckpt_rel = Path("runs") / "simclr" / "checkpoint.pt"
    ckpt = load_checkpoint(ws / ckpt_rel)
    assert "image_size" not in ckpt["backbone_config"]
    bare = {k: v for k, v in ckpt.items() if k not in ("augment", "input")}
    assert input_spec(bare, {}, ckpt_rel, ws)["image_size"] == 28
    with pytest.raises(DataError, match="cannot tell the input size"):
        input_spec(bare, {}, ckpt_rel, tmp_path)
    # mixed sizes (shard.image_size null): the shorter side of the most common stored size
    mixed = {"image_size": {"uniform": None, "stored": {"most_common": [[32, 24, 7], [16, 16, 2]]}}}
    assert manifest_image_size(mixed) == 24
    assert manifest_image_size({"image_size": {"uniform": [30, 20]}}) == 20
    assert manifest_image_size({}) is None and manifest_image_size({"image_size": {"max": [28, 28]}}) is None


def _metrics_doc(method: str, family: str, knn: float, probe: float) -> dict:
    return {
        "method": method,
        "family": family,
        "architecture": "resnet18",
        "knn_top1_k20": knn,
        "knn_top5_k20": 0.9,
        "knn_top1_k200": knn,
        "knn_top5_k200": 0.95,
        "linear_probe_top1": probe,
        "rankme": 12.5,
        "emb_std": 0.05,
        "knn_temperature": 0.1,
        "data_version": "abc.dir",
        "primary_metric": "linear_probe_top1" if family == "masked_image_modeling" else "knn_top1_k200",
        "pretraining": {"train_seconds": 90.0, "images_per_s": 321.0},
        "baselines": {
            "raw_pixels": {"knn_top1_k200": 0.8, "knn_top5_k200": 0.9, "linear_probe_top1": 0.85},
            "random_init": {"knn_top1_k200": 0.5, "knn_top5_k200": 0.7, "linear_probe_top1": 0.6},
        },
        "lineage": {
            "stage": "evaluate",
            "data_version": "abc.dir",
            "git": {"commit": "f" * 40},
            "parents": {"backbone": {"path": f"models/{method}/backbone.safetensors"}},
        },
    }


def test_report_groups_methods_by_family_and_judges_mim_by_linear_probe(tmp_path, monkeypatch):
    """Report rendering on hand-written metrics files (no training, no shards, no curves)."""
    from stages.report import report

    ws = tmp_path / "ws"
    (ws / "metrics").mkdir(parents=True)
    params = tp.tiny_params()
    params["methods"] = ["mae", "vicreg", "simclr"]
    tp.write_params(ws, params)
    for doc in (
        _metrics_doc("mae", "masked_image_modeling", 0.31, 0.71),
        _metrics_doc("vicreg", "canonical_correlation_analysis", 0.62, 0.66),
        _metrics_doc("simclr", "deep_metric_learning", 0.83, 0.88),
    ):
        (ws / "metrics" / f"{doc['method']}.json").write_text(json.dumps(doc))
    monkeypatch.setenv("SSLCOOK_WORKSPACE", str(ws))
    summary = report(ws)
    md = (ws / "reports" / "summary.md").read_text()
    by_family = md.split("## Results by family")[1].split("## Baselines")[0]
    rows = [
        line for line in by_family.splitlines() if line.startswith("| ") and line.split(" | ")[1] in params["methods"]
    ]
    # the Cookbook's family order, whatever the order in params
    assert [r.split(" | ")[1] for r in rows] == ["simclr", "vicreg", "mae"]
    assert rows[2].startswith("| masked image modeling | mae") and rows[2].rstrip(" |").endswith("linear probe")
    assert rows[0].rstrip(" |").endswith("kNN") and "1.5 min" in rows[0] and "321" in rows[0]
    assert summary["methods"]["mae"]["primary_metric"] == "linear_probe_top1"
    assert summary["data_version"] == "abc.dir"
    # no runs/ and no shards: the report still renders, without curves and view grids
    assert not (ws / "reports" / "figures" / "loss_curves.png").exists()
    assert (ws / "reports" / "figures" / "accuracy.png").exists()


def _stage_error(capsys, fn) -> tuple[int, str]:
    from stages.workspace.common import run_main

    with pytest.raises(SystemExit) as exited:
        run_main(fn)
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return exited.value.code, err


def test_stages_reject_bad_inputs_with_one_line(pipeline, tmp_path, monkeypatch, capsys):
    from stages import evaluate, export, shard

    ws = copy_workspace(pipeline["ws"], tmp_path / "ws")
    monkeypatch.setenv("SSLCOOK_WORKSPACE", str(ws))
    monkeypatch.chdir(ws)
    weights = ws / "models" / "simclr" / "backbone.safetensors"
    card = ws / "models" / "simclr" / "model_card.json"
    good_weights, good_card = weights.read_bytes(), card.read_text()

    weights.write_bytes(good_weights[: len(good_weights) // 2])  # truncated download
    code, err = _stage_error(capsys, lambda: evaluate.main(["--method", "simclr"]))
    assert code == 1 and "backbone.safetensors" in err

    weights.write_bytes(good_weights)
    doc = json.loads(good_card)
    doc["backbone_config"]["width"] = 8  # a card written for another architecture
    card.write_text(json.dumps(doc))
    code, err = _stage_error(capsys, lambda: evaluate.main(["--method", "simclr"]))
    assert "model_card.json: backbone_config" in err

    doc = json.loads(good_card)
    doc["feature_dim"] = 64
    card.write_text(json.dumps(doc))
    assert "feature_dim 64" in _stage_error(capsys, lambda: evaluate.main(["--method", "simclr"]))[1]

    weights.unlink()
    assert "not found" in _stage_error(capsys, lambda: evaluate.main(["--method", "simclr"]))[1]
    (ws / "runs" / "simclr" / "checkpoint.pt").write_bytes(b"garbage")
    assert "not a loadable checkpoint" in _stage_error(capsys, lambda: export.main(["--method", "simclr"]))[1]
    code, err = _stage_error(capsys, lambda: export.main(["--method", "byol"]))
    assert code == 2 and "byol" in err

    # a test class that train does not have: re-shard raw data with one train class removed
    weights.write_bytes(good_weights)
    card.write_text(good_card)
    shutil.rmtree(ws / "data" / "raw" / "train" / "7")
    shard.main()
    capsys.readouterr()
    code, err = _stage_error(capsys, lambda: evaluate.main(["--method", "simclr"]))
    assert code == 1 and "absent from train: 7" in err
    # nothing partial: the metrics file of the good run is still there, unchanged
    assert json.loads((ws / "metrics" / "simclr.json").read_text()) == json.loads(
        (pipeline["ws"] / "metrics" / "simclr.json").read_text()
    )


def _with_intervals(doc: dict, simclr_beats_pixels: bool) -> dict:
    """A metrics doc as evaluate writes it since the bootstrap: intervals beside the points, paired comparisons."""
    doc = json.loads(json.dumps(doc))
    doc["bootstrap"] = {"resamples": 2000, "level": 0.95, "seed": 0}
    doc["intervals"] = {
        k: {"low": doc[k] - 0.02, "high": doc[k] + 0.015}
        for k in ("knn_top1_k20", "knn_top1_k200", "linear_probe_top1")
    }
    for b in doc["baselines"].values():
        b["intervals"] = {k: {"low": b[k] - 0.01, "high": b[k] + 0.01} for k in ("knn_top1_k200", "linear_probe_top1")}
    comparison = {
        "raw_pixels": {
            "knn_top1_k200": {"difference": 0.004, "low": -0.008, "high": 0.016, "p_value": 0.52, "verdict": "ties"},
            "linear_probe_top1": (
                {"difference": 0.03, "low": 0.012, "high": 0.047, "p_value": 0.001, "verdict": "beats"}
                if simclr_beats_pixels
                else {"difference": -0.03, "low": -0.047, "high": -0.012, "p_value": 0.002, "verdict": "trails"}
            ),
        },
        "random_init": {
            "knn_top1_k200": {"difference": 0.3, "low": 0.27, "high": 0.33, "p_value": 0.0005, "verdict": "beats"},
            "linear_probe_top1": {"difference": 0.25, "low": 0.22, "high": 0.28, "p_value": 0.0005, "verdict": "beats"},
        },
    }
    doc["comparisons"] = comparison
    return doc


def test_report_shows_intervals_and_verdicts_against_baselines(tmp_path, monkeypatch):
    from stages.report import report

    ws = tmp_path / "ws"
    (ws / "metrics").mkdir(parents=True)
    params = tp.tiny_params()
    params["methods"] = ["simclr", "mae"]
    tp.write_params(ws, params)
    docs = [
        _with_intervals(_metrics_doc("simclr", "deep_metric_learning", 0.873, 0.930), True),
        _with_intervals(_metrics_doc("mae", "masked_image_modeling", 0.701, 0.894), False),
    ]
    for doc in docs:
        (ws / "metrics" / f"{doc['method']}.json").write_text(json.dumps(doc))
    monkeypatch.setenv("SSLCOOK_WORKSPACE", str(ws))
    summary = report(ws)
    md = (ws / "reports" / "summary.md").read_text()
    results = md.split("## Results\n")[1].split("## Against the baselines")[0]
    simclr_row = next(line for line in results.splitlines() if line.startswith("| deep metric learning | simclr"))
    # point value and its interval in one cell, as the README shows them
    assert "| 0.930 [0.910, 0.945] |" in simclr_row and "| 0.873 [0.853, 0.888] |" in simclr_row
    assert "| baseline: raw pixels |" in results and "0.850 [0.840, 0.860]" in results
    assert "95% bootstrap interval" in results
    verdicts = md.split("## Against the baselines")[1].split("## Results by family")[0]
    assert "simclr beats raw pixels on linear probe top-1: +0.030 [+0.012, +0.047], p = 0.001" in verdicts
    assert "mae trails raw pixels on linear probe top-1: -0.030 [-0.047, -0.012], p = 0.002" in verdicts
    assert "simclr ties raw pixels on kNN top-1 k=200: +0.004 [-0.008, +0.016], p = 0.520" in verdicts
    assert "simclr beats random init (resnet18) on kNN top-1 k=200" in verdicts
    table = [line for line in verdicts.splitlines() if line.startswith("| simclr | raw pixels")]
    assert table == [
        "| simclr | raw pixels | ties +0.004 [-0.008, +0.016], p 0.520 | beats +0.030 [+0.012, +0.047], p 0.001 |"
    ]
    # the same lines in summary.json, and the intervals beside the point values
    assert "mae trails raw pixels on linear probe top-1: -0.030 [-0.047, -0.012], p = 0.002" in summary["verdicts"]
    assert len(summary["verdicts"]) == 8  # 2 methods x 2 baselines x 2 metrics
    saved = json.loads((ws / "reports" / "summary.json").read_text())
    assert saved["verdicts"] == summary["verdicts"]
    assert saved["methods"]["simclr"]["linear_probe_top1"] == 0.930
    assert saved["methods"]["simclr"]["intervals"]["linear_probe_top1"] == pytest.approx({"low": 0.91, "high": 0.945})
    assert "interval" in (ws / "reports" / "summary.html").read_text()


def test_accuracy_figure_has_error_bars_from_the_intervals(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages import report as report_stage

    doc = _with_intervals(_metrics_doc("simclr", "deep_metric_learning", 0.873, 0.930), True)
    drawn = []
    real_bar = matplotlib.axes.Axes.bar

    def spy(self, *args, **kwargs):
        drawn.append(kwargs.get("yerr"))
        return real_bar(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", spy)
    report_stage.plot_accuracy(["simclr"], {"simclr": doc}, tmp_path / "acc.png", 50)
    plt.close("all")
    assert drawn == [[[pytest.approx(0.02)], [pytest.approx(0.015)]]] * 2
    # a metrics file from before the bootstrap has no intervals: bars without error bars
    drawn.clear()
    old = _metrics_doc("simclr", "deep_metric_learning", 0.873, 0.930)
    report_stage.plot_accuracy(["simclr"], {"simclr": old}, tmp_path / "acc.png", 50)
    assert drawn == [None, None]


def test_summary_html_is_the_markdown_rendered_with_text_kept_as_text(tmp_path, monkeypatch):
    """One template: summary.html shows exactly summary.md's headings, table cells and figures; a title with markup
    in params stays text in both."""
    import html
    import re

    from stages.report import report

    ws = tmp_path / "ws"
    (ws / "metrics").mkdir(parents=True)
    params = tp.tiny_params()
    params["methods"] = ["simclr", "rotnet"]
    params["report"]["title"] = "<b>cookbook</b> & co"
    tp.write_params(ws, params)
    for doc in (
        _with_intervals(_metrics_doc("simclr", "deep_metric_learning", 0.873, 0.930), True),
        _with_intervals(_metrics_doc("rotnet", "origins", 0.6, 0.75), False),
    ):
        (ws / "metrics" / f"{doc['method']}.json").write_text(json.dumps(doc))
    monkeypatch.setenv("SSLCOOK_WORKSPACE", str(ws))
    report(ws)
    md = (ws / "reports" / "summary.md").read_text()
    page = (ws / "reports" / "summary.html").read_text()

    def text(s: str) -> str:
        return html.escape(s, quote=False)

    headings = [line[3:] for line in md.splitlines() if line.startswith("## ")]
    assert "Origins vs modern" in headings and "Against the baselines" in headings
    assert re.findall(r"<h2>(.*?)</h2>", page) == [text(h) for h in headings]
    md_cells = [cell for line in md.splitlines() if line.startswith("| ") for cell in line[2:-2].split(" | ")]
    assert len(md_cells) > 100
    assert re.findall(r"<t[hd]>(.*?)</t[hd]>", page) == [text(c) for c in md_cells]
    assert (
        f"<li>{text('simclr beats raw pixels on linear probe top-1: +0.030 [+0.012, +0.047], p = 0.001')}</li>" in page
    )
    assert md.startswith("# <b>cookbook</b> & co\n")
    assert "<b>" not in page and page.count("&lt;b&gt;cookbook&lt;/b&gt; &amp; co") == 2  # <title> and <h1>
    assert page.count("data:image/png;base64,") == md.count("](figures/") == 1  # no runs/, no shards: accuracy only


def test_view_grid_views_come_from_the_seed_alone():
    """The view grid's views: per image one view per pipeline of the recipe, the same for the same seed, the
    caller's random state untouched; a card the recipe cannot be built from gives no grid."""
    from ssl_models import registry
    from stages.report import augmented_views, view_recipe

    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    recipe, options, _, _ = view_recipe("simclr", {"input": {"image_size": 24}}, channels=1)
    assert recipe == registry.get("simclr").cls.augment and options["image_size"] == 24
    torch.manual_seed(123)
    state = torch.get_rng_state()
    views = augmented_views("simclr", recipe, options, images, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(views) == 3 and {len(row) for row in views} == {2}
    assert all(v.shape == (1, 24, 24) and v.is_floating_point() for row in views for v in row)
    again = augmented_views("simclr", recipe, options, images, seed=0)
    other = augmented_views("simclr", recipe, options, images, seed=1)
    assert all(torch.equal(a, b) for ra, rb in zip(views, again) for a, b in zip(ra, rb))
    assert not all(torch.equal(a, b) for ra, rb in zip(views, other) for a, b in zip(ra, rb))
    assert augmented_views("simclr", recipe, {**options, "image_size": None}, images, seed=0) is None
