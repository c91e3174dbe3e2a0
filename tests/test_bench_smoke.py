"""The benchmark scripts run end to end in their tiny modes (bench/; results checked for sane content).

lightly is an optional extra (``pip install -e .[bench]``): without it these tests are skipped. The project's own
packages never import it, which the last test checks on the source.
"""

from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
lightly = pytest.importorskip("lightly")


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory, cifar_archive):
    """The tiny cifar workload decoded once for the module (the scripts read SSLCOOK_BENCH_CACHE)."""
    import os

    cache = tmp_path_factory.mktemp("bench-cache")
    old = os.environ.get("SSLCOOK_BENCH_CACHE")
    os.environ["SSLCOOK_BENCH_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("SSLCOOK_BENCH_CACHE", None)
    else:
        os.environ["SSLCOOK_BENCH_CACHE"] = old


def test_workload_first_images_per_class_in_name_order(bench_cache, cifar_archive):
    from bench.workload import cifar10k

    wl = cifar10k(cifar_archive, train_per_class=2, test_per_class=1)
    assert wl.train_images.dtype.is_floating_point is False and wl.train_images.shape == (20, 3, 32, 32)
    assert wl.train_labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert wl.test_images.shape == (10, 3, 32, 32)
    assert list(bench_cache.glob("cifar-*-2-1.pt")), "decoded once into the cache"
    again = cifar10k(cifar_archive, train_per_class=2, test_per_class=1)
    assert bool((again.train_images == wl.train_images).all())


def test_both_sides_build_every_method_with_the_same_head_sizes():
    import torch

    from bench.steps import METHODS, build_side

    torch.manual_seed(0)
    for method in METHODS:
        if method == "mae":  # lightly's MAE backbone learns its positions; the project's are fixed sine-cosine
            continue
        project = build_side("project", method, total_steps=10, batch_size=8)
        peer = build_side("lightly", method, total_steps=10, batch_size=8)
        # lightly's SimCLR head ends in a BatchNorm (a few hundred parameters); otherwise the counts are equal
        assert abs(project.parameters() - peer.parameters()) <= 1e-3 * project.parameters(), method


@pytest.mark.slow  # subprocesses importing torch + lightly: ~25-40 s idle, minutes on a busy machine
def test_throughput_tiny_measures_both_sides_in_separate_processes(bench_cache, tmp_path):
    from bench import throughput

    assert throughput.main(["--tiny", "--methods", "simclr", "--results-dir", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "throughput-tiny.json").read_text())["methods"]["simclr"]
    assert set(r["images_per_s"]) == {"project", "lightly", "bare"}
    assert all(v > 0 for v in r["images_per_s"].values())
    assert r["ratio_project_over_lightly"] > 0 and len(r["ratios"]) == 1
    assert all(v > 100 for v in r["peak_rss_mb"].values())  # each side's own process (torch alone is > 100 MB)


@pytest.mark.slow  # subprocesses importing torch + lightly: ~25-40 s idle, minutes on a busy machine
def test_quality_and_gpu_script_tiny(bench_cache, tmp_path):
    from bench import quality

    assert (
        quality.main(
            [
                "--tiny",
                "--methods",
                "simclr",
                "--train-per-class",
                "4",
                "--test-per-class",
                "2",
                "--batch-size",
                "8",
                "--results-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    r = json.loads((tmp_path / "quality-cifar10k-tiny.json").read_text())
    for side in ("project", "lightly"):
        assert 0.0 <= r["methods"]["simclr"][side]["knn_top1"] <= 1.0
        assert r["methods"]["simclr"][side]["steps"] == 5  # 40 images // 8, one epoch
    assert {"raw_pixels", "random_init_resnet"} <= set(r["baselines"])

    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--tiny", "--methods", "simclr", "--results-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    g = json.loads((tmp_path / "gpu-tiny.json").read_text())
    assert g["device"] == "cpu" and g["throughput"]["simclr"]["ratio_project_over_lightly"] > 0
    d = g["datapath"]["methods"]["simclr"]
    assert d["batched"]["images_per_s"] > 0 and d["persample"]["images_per_s"] > 0
    assert 0.0 <= d["batched"]["data_wait_share"] <= 1.0 and 0.0 <= d["persample"]["data_wait_share"] <= 1.0
    assert 0.0 <= g["quality"]["project"]["knn_top1"] <= 1.0


def test_quality_runs_split_over_processes_combine_into_one_table(tmp_path, capsys):
    from bench import quality

    def part(name, method, side, knn, baselines=None, workload="cifar10k"):
        data = {
            "machine": {"date": name},
            "workload": {"name": workload},
            "settings": {"sides": [side]},
            "baselines": baselines or {},
            "methods": {method: {side: {"knn_top1": knn, "epochs": 3}}},
        }
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        return str(path)

    a = part("p", "simclr", "project", 0.61, {"raw_pixels": {"knn_top1": 0.3}})
    b = part("l", "simclr", "lightly", 0.58)
    assert quality.main(["--combine", a, b, "--results-dir", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "quality-cifar10k.json").read_text())
    assert merged["methods"]["simclr"] == {
        "project": {"knn_top1": 0.61, "epochs": 3},
        "lightly": {"knn_top1": 0.58, "epochs": 3},
    }
    assert merged["baselines"] == {"raw_pixels": {"knn_top1": 0.3}} and len(merged["parts"]) == 2
    assert "| simclr | 3 / 3 | 0.610 | 0.580 | 3.000 |" in capsys.readouterr().out
    other = part("o", "byol", "lightly", 0.5, workload="mnist5k")
    with pytest.raises(SystemExit, match="different workloads"):
        quality.main(["--combine", a, other, "--results-dir", str(tmp_path)])


def test_lightly_own_data_path_keeps_the_batch_order_and_makes_lightly_views():
    """Equal wall time compares each side on its own data path: lightly's transforms per PIL image in DataLoader
    workers, over the same seeded permutation (so the same images per batch) as the project's batches."""
    import torch

    from bench import quality
    from bench.viewpath import lightly_views

    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(20)
    own = quality.own_batches(
        images,
        labels,
        lightly_views("simclr", image_size=32, channels=3),
        batch_size=8,
        epochs=2,
        seed=3,
        workers=0,
        channels=3,
    )
    got = list(own)
    ours = [
        b
        for e in range(2)
        for b in quality.batches(images, labels, lambda x, g: [x.float()], batch_size=8, epoch=e, seed=3)
    ]
    assert len(got) == len(ours) == 4  # 2 full batches of 8 per epoch of 20
    for (views, lab), (_, ref) in zip(got, ours):
        assert torch.equal(lab, ref)
        assert len(views) == 2 and views[0].shape == (8, 3, 32, 32) and views[0].dtype == torch.float32
        assert not torch.equal(views[0], views[1])  # two random views of each image
    assert quality.budget_epochs(600, 107.9, 9984) == 6
    assert quality.budget_epochs(1, 1.0, 9984) == 1  # at least one epoch


@pytest.mark.slow  # imports torch + lightly, trains a few steps
def test_quality_time_budget_sets_each_sides_epochs_from_its_calibrated_rate(bench_cache, tmp_path):
    from bench import quality

    args = ["--tiny", "--methods", "simclr", "--train-per-class", "4", "--test-per-class", "2", "--batch-size", "8"]
    args += ["--seconds", "2", "--calibrate-steps", "2", "--own-data-path", "--workers", "1", "--skip-baselines"]
    assert quality.main(args + ["--results-dir", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "quality-cifar10k-tiny.json").read_text())["methods"]["simclr"]
    assert r["lightly"]["data_path"].startswith("lightly: its own transform")
    assert r["project"]["data_path"].startswith("project: batched ViewMaker")
    for side in ("project", "lightly"):
        row = r[side]
        assert row["calibrated_images_per_s"] > 0 and 0.0 <= row["knn_top1"] <= 1.0
        assert row["epochs"] == quality.budget_epochs(2, row["calibrated_images_per_s"], 40)
        assert row["steps"] == row["epochs"] * 5


def test_lightly_side_on_the_pipeline_backbones():
    """mnist5k: lightly's heads on the project's width-16 ResNet, lightly's MAE on a ViT of the pipeline's shape."""
    import torch

    from bench import steps

    torch.manual_seed(0)
    views = [torch.randn(8, 1, 28, 28) for _ in range(2)]
    resnet = {"name": "resnet18", "small_image": True, "width": 16, "stem_stride": 2}
    side = steps.lightly_side("byol", image_size=28, channels=1, total_steps=2, batch_size=8, backbone_cfg=resnet)
    assert torch.isfinite(torch.tensor(side.step(views, 0)))
    assert side.backbone(views[0]).shape == (8, 128)  # the project's backbone: width 16 -> 128 features
    vit = {"name": "vit_tiny", "patch_size": 4, "depth": 2, "global_pool": "mean"}
    side = steps.lightly_side("mae", image_size=28, channels=1, total_steps=2, batch_size=8, backbone_cfg=vit)
    assert torch.isfinite(torch.tensor(side.step(views, 0)))
    assert len(side.model.backbone.encoder.layers) == 2
    assert side.backbone(views[0]).shape == (8, 192)


def test_timed_project_step_runs_under_the_engines_cpu_settings(monkeypatch):
    """bench.throughput times the project's step outside Trainer.fit: it must switch on what fit switches on."""
    import torch

    from bench import steps

    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    seen = {}
    side, trainer = steps.project_side("simclr", image_size=16, total_steps=1, batch_size=4)
    monkeypatch.setattr(
        trainer,
        "_fit",
        lambda total: seen.setdefault(
            "fit", (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
        ),
    )
    trainer.fit()
    try:
        steps.engine_cpu_mode()
        assert (
            (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
            == seen["fit"]
            == (True, False)
        )
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.utils.deterministic.fill_uninitialized_memory = before[1]


def test_project_code_never_imports_the_peer():
    for package in ("flows", "stages", "ssl_models"):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                assert not any(n.split(".")[0] == "lightly" for n in names), f"{path} imports lightly"


@pytest.mark.parametrize("recipe", ["simclr", "byol", "multicrop", "mim"])
def test_batched_views_keep_the_per_sample_baselines_shapes_and_are_seeded(recipe):
    """bench.viewpath's ViewMaker (the batched path, or its per-sample stand-in before it exists) makes the
    views the per-sample baseline makes, one batch at a time; the same generator gives the same views."""
    import torch

    from bench import persample, viewpath

    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    baseline = persample.build_views(recipe, image_size=16, channels=3)(images[0])
    maker = viewpath.view_maker(recipe, image_size=16, channels=3)
    views = maker(images, viewpath.view_generator(0, 1, 2, 0))
    assert [tuple(v.shape) for v in views] == [(4, *b.shape) for b in baseline]
    assert all(v.dtype == torch.float32 for v in views)
    again = maker(images, viewpath.view_generator(0, 1, 2, 0))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    other = maker(images, viewpath.view_generator(0, 1, 3, 0))
    assert not all(torch.equal(a, b) for a, b in zip(views, other))


def test_decode_loader_yields_uint8_batches_of_the_shards(tmp_path):
    import torch

    from bench import viewpath
    from bench.workload import mnist5k

    wl = mnist5k(train_per_class=2, test_per_class=1)
    urls = viewpath.train_urls(viewpath.make_shards(wl, tmp_path))
    batches = list(viewpath.decode_loader(urls, batch_size=4, num_workers=0, shuffle_buffer=0))
    assert len(batches) == 5 and all(b[0].dtype == torch.uint8 and b[0].shape == (4, 1, 28, 28) for b in batches)
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == sorted(wl.train_labels.tolist())
    # the per-sample and lightly sides read the same shards
    lightly_views = viewpath.lightly_views("simclr", image_size=28, channels=1, strengths={"crop_scale": [0.4, 1]})
    views, labels = next(
        iter(viewpath.sample_loader(urls, lightly_views, pil=True, mode="L", batch_size=4, num_workers=0))
    )
    assert len(views) == 2 and views[0].shape == (4, 1, 28, 28) and labels.shape == (4,)


def test_datapath_tiny_times_every_side_and_the_step(tmp_path):
    from bench import datapath

    assert datapath.main(["--tiny", "--workloads", "mnist5k", "--workers", "0", "--results-dir", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "datapath-tiny.json").read_text())
    w = r["workloads"]["mnist5k"]
    assert set(w["images_per_s"]) == {"batched/w0", "persample/w0", "lightly/w0", "step"}
    assert all(v > 0 for v in w["images_per_s"].values())
    assert w["ratios"]["batched/step w0"] == pytest.approx(w["images_per_s"]["batched/w0"] / w["images_per_s"]["step"])
    assert isinstance(r["batched_path_in_tree"], bool) and r["machine"]["load_average"]
    assert r["settings"]["augment"]["crop_scale"] == [0.4, 1.0]  # params.yaml's method.simclr.augment


def test_e2e_tiny_project_vs_lightly_and_project_only_methods(bench_cache, tmp_path):
    from bench import e2e

    assert (
        e2e.main(
            ["--tiny", "--methods", "simclr", "rotnet", "deepcluster", "--workers", "0", "--results-dir", str(tmp_path)]
        )
        == 0
    )
    m = json.loads((tmp_path / "e2e-tiny.json").read_text())["methods"]
    assert m["simclr"]["images_per_s"]["project"] > 0 and m["simclr"]["images_per_s"]["lightly"] > 0
    assert m["simclr"]["ratio_project_over_lightly"] > 0
    assert set(m["rotnet"]["images_per_s"]) == {"project"} and "no lightly counterpart" in m["rotnet"]["note"]
    assert "not timed" in m["deepcluster"]["note"]
    with pytest.raises(SystemExit):
        e2e.main(["--tiny", "--methods", "nosuchmethod"])


def test_views_share_tiny_reports_the_views_share_of_a_step(tmp_path):
    from bench import views_share

    assert views_share.main(["--tiny", "--methods", "simclr", "--results-dir", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "views_share-tiny.json").read_text())["methods"]["simclr"]
    assert set(r["images_per_s"]) == {"serial", "overlap", "views_only"} and all(
        v > 0 for v in r["images_per_s"].values()
    )
    assert 0.0 < r["views_share_of_serial_step"] < 1.0 and r["overlap_over_serial"] > 0
