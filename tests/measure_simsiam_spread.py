"""Spread of the two SimSiam collapse tests over seeds and CPU kernel settings (not part of the suite).

    for isa in default avx2 native; do
      if [ $isa = default ]; then
        export ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41
      elif [ $isa = avx2 ]; then export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
      else unset ATEN_CPU_CAPABILITY MKL_ENABLE_INSTRUCTIONS ONEDNN_MAX_CPU_ISA; fi
      MEASURE_OUT=simsiam.jsonl python -m pytest -q -p no:cacheprovider tests/measure_simsiam_spread.py
    done

One JSON line per run: the numbers tests/test_method_simsiam.py and tests/test_pretrain_stage.py assert on, so their
bounds can be checked against every setting (BENCHMARKS.md lists the results).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml

from ssl_models.monitors import embedding_std, rankme
from stages import pretrain as stage
from support.method_checks import N_BATCHES, make, train, view_batches
from support.tiny_ssl import make_stage_workspace
from test_pretrain_stage import shards  # noqa: F401  (fixture)

SETTING = os.environ.get("ATEN_CPU_CAPABILITY", "native")


def record(row: dict) -> None:
    with open(os.environ.get("MEASURE_OUT", "simsiam_spread.jsonl"), "a") as fh:
        fh.write(json.dumps({"setting": SETTING, **row}) + "\n")


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_methods_more_numbers(seed, cifar_tensors):
    images, _ = cifar_tensors
    row = {"test": "test_simsiam_without_predictor_heads_for_collapse", "seed": seed}
    for use_predictor in (True, False):
        torch.manual_seed(seed)
        method = make("simsiam", use_predictor=use_predictor)
        losses, embeddings = train(method, view_batches(images, method.augment))
        final = torch.cat(embeddings[-N_BATCHES:])
        row[f"loss_predictor_{use_predictor}"] = sum(losses[-N_BATCHES:]) / N_BATCHES
        row[f"std_ratio_predictor_{use_predictor}"] = embedding_std(final) * math.sqrt(final.shape[1])
        row[f"rankme_predictor_{use_predictor}"] = float(rankme(final))
    record(row)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pretrain_stage_numbers(seed, tmp_path, shards):  # noqa: F811
    common = {"epochs": 6, "batch_size": 8, "final_lr_ratio": 1.0, "monitor": {"min_rankme": 10.0}}
    row = {"test": "test_collapse_of_simsiam_without_predictor_is_detected", "seed": seed}
    for use_predictor in (False, True):
        over = {"simsiam": {"use_predictor": use_predictor, "base_lr": 1.0, "weight_decay": 0.0}}
        ws = make_stage_workspace(
            tmp_path / f"ws{use_predictor}", shards, methods=["simsiam"], pretrain=common, method_overrides=over
        )
        params = yaml.safe_load((ws / "params.yaml").read_text())
        params["seed"] = seed
        (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        stage.pretrain("simsiam", root=ws)
        header, *rows = (ws / "runs" / "simsiam" / "history.tsv").read_text().splitlines()
        column = header.split("\t").index("rankme")
        row[f"rankme_per_epoch_predictor_{use_predictor}"] = [float(r.split("\t")[column]) for r in rows]
    record(row)
