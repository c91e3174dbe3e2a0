"""The report's "origins vs modern" table: origins methods by the Cookbook's category, then the modern families,
each with its paired linear-probe comparison against the random-init backbone of its architecture; none without
both kinds."""

from __future__ import annotations

from stages.report import family_sorted, origins_vs_modern_rows


def _m(family, probe, arch="resnet18", random_probe=0.700):
    diff = round(probe - random_probe, 3)
    paired = {
        "difference": diff,
        "low": diff - 0.02,
        "high": diff + 0.02,
        "p_value": 0.001,
        "verdict": "beats" if diff - 0.02 > 0 else "ties",
    }
    return {
        "family": family,
        "architecture": arch,
        "linear_probe_top1": probe,
        "knn_top1_k200": probe - 0.1,
        "baselines": {"random_init": {"linear_probe_top1": random_probe, "knn_top1_k200": 0.6}},
        "comparisons": {"random_init": {"linear_probe_top1": paired}},
    }


def test_origins_by_category_then_modern_with_gain_over_random_init():
    metrics = {
        "simclr": _m("deep_metric_learning", 0.930),
        "rotnet": _m("origins", 0.850),
        "inpainting": _m("origins", 0.720),
        "deepcluster": _m("origins", 0.800),
        "mae": _m("masked_image_modeling", 0.894, "vit_tiny", random_probe=0.656),
    }
    order = family_sorted(list(metrics), metrics)
    assert order[-3:] == ["deepcluster", "inpainting", "rotnet"]  # origins after the four modern families
    header, rows = origins_vs_modern_rows(order, metrics)
    assert header[-1] == "probe vs random init (paired)"
    assert [r[:3] for r in rows] == [
        ["origins", "information restoration", "inpainting"],
        ["origins", "spatial context", "rotnet"],
        ["origins", "grouping", "deepcluster"],
        ["modern", "deep metric learning", "simclr"],
        ["modern", "masked image modeling", "mae"],
    ]
    gains = {r[2]: r[-1] for r in rows}
    assert gains["inpainting"] == "ties +0.020 [+0.000, +0.040], p 0.001"
    assert gains["rotnet"] == "beats +0.150 [+0.130, +0.170], p 0.001"
    assert {m: g.split()[1] for m, g in gains.items()} == {
        "inpainting": "+0.020",
        "rotnet": "+0.150",
        "deepcluster": "+0.100",
        "simclr": "+0.230",
        "mae": "+0.238",
    }


def test_no_table_without_both_kinds():
    assert origins_vs_modern_rows(["simclr"], {"simclr": _m("deep_metric_learning", 0.9)})[1] == []
    assert origins_vs_modern_rows(["rotnet"], {"rotnet": _m("origins", 0.9)})[1] == []
