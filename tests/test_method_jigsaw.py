"""Jigsaw: the permutation set is deterministic with the documented minimum Hamming distance, the tiles are
shuffled by the permutation the label names, the loss is cross entropy, 20 steps on digits lower it, and export
keeps the backbone only."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ssl_models import build_backbone, registry
from ssl_models.methods.jigsaw import Jigsaw, PermutationLoss, hamming_permutations, min_hamming_distance, shuffle_tiles
from support.origins_utils import digits, export_loads_in_torchvision, numpy_cross_entropy, twenty_steps_lower_the_loss
from support.tiny_ssl import write_tiny_shards

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registered_as_spatial_context_of_the_origins():
    spec = registry.get("jigsaw")
    assert spec.family == "origins" and spec.cls.category == "spatial_context"


def test_permutation_set_is_deterministic_distinct_and_has_the_documented_min_distance():
    fresh = hamming_permutations.__wrapped__(9, 100)  # computed again, not the cached copy
    np.testing.assert_array_equal(fresh, hamming_permutations(9, 100))
    assert fresh.shape == (100, 9) and len({tuple(p) for p in fresh}) == 100
    assert all(sorted(p) == list(range(9)) for p in fresh.tolist())
    assert fresh[0].tolist() == list(range(9))  # starts from the identity
    assert min_hamming_distance(fresh) == 6  # documented in hamming_permutations
    # a loop reference of the minimum pairwise distance
    assert min(sum(a != b for a, b in zip(p, q)) for p, q in itertools.combinations(fresh.tolist(), 2)) == 6
    small = hamming_permutations.__wrapped__(4, 24)
    assert {tuple(p) for p in small} == set(itertools.permutations(range(4))) and min_hamming_distance(small) == 2
    with pytest.raises(ValueError, match="num_permutations"):
        hamming_permutations.__wrapped__(4, 25)


@pytest.mark.parametrize("grid", [2, 3])
def test_tiles_are_shuffled_by_the_permutation_the_label_names(grid):
    cell, tile = 6, 4
    images = torch.zeros(5, 1, grid * cell, grid * cell)
    for r in range(grid):
        for c in range(grid):  # cell j holds the constant j (row-major)
            images[:, :, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = r * grid + c
    perms = torch.from_numpy(hamming_permutations(grid * grid, 6 if grid == 2 else 10))
    labels = torch.tensor([0, 1, 2, 3, 5])
    torch.manual_seed(0)
    tiles = shuffle_tiles(images, perms, labels, grid=grid, tile_size=tile, jitter=True, normalize_tiles=False)
    assert tiles.shape == (5, grid * grid, 1, tile, tile)
    for b in range(5):
        for p in range(grid * grid):  # jitter moves a tile inside its cell, never across the gap
            assert torch.all(tiles[b, p] == perms[labels[b], p]), (b, p)
    normalised = shuffle_tiles(images + torch.rand_like(images), perms, labels, grid=grid, tile_size=tile)
    assert torch.allclose(normalised.mean(dim=(2, 3, 4)), torch.zeros(5, grid * grid), atol=1e-5)


def test_jitter_crops_each_tile_at_its_own_offset_inside_its_cell():
    cell, tile, n = 8, 5, 64
    ys, xs = torch.meshgrid(torch.arange(2 * cell), torch.arange(2 * cell), indexing="ij")
    images = (ys * 100 + xs).float().expand(n, 1, -1, -1).contiguous()  # a pixel's value names its place
    perms = torch.from_numpy(hamming_permutations(4, 24))
    labels = torch.zeros(n, dtype=torch.long)  # the identity: tile p is cell p
    torch.manual_seed(0)
    tiles = shuffle_tiles(images, perms, labels, grid=2, tile_size=tile, jitter=True, normalize_tiles=False)
    offsets = set()
    for b in range(n):
        for p in range(4):
            r, c = divmod(p, 2)
            y0, x0 = divmod(int(tiles[b, p, 0, 0, 0]), 100)
            assert r * cell <= y0 <= (r + 1) * cell - tile and c * cell <= x0 <= (c + 1) * cell - tile
            assert torch.equal(tiles[b, p, 0], images[b, 0, y0 : y0 + tile, x0 : x0 + tile])  # a contiguous crop
            offsets.add((p, y0 - r * cell, x0 - c * cell))
    assert len(offsets) > 4 * 9  # offsets differ between images, not one per cell for the whole batch
    fixed = shuffle_tiles(images, perms, labels, grid=2, tile_size=tile, jitter=False, normalize_tiles=False)
    assert int(fixed[0, 0, 0, 0, 0]) == 101  # no jitter: the centred crop (slack 3 -> offset 1)


def test_loss_is_the_cross_entropy_over_the_permutation_set():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 24, generator=g), torch.randint(0, 24, (6,), generator=g)
    assert float(PermutationLoss()(logits, labels)) == pytest.approx(
        numpy_cross_entropy(logits.numpy(), labels.numpy()), abs=1e-6
    )


def test_twenty_steps_lower_the_loss_on_digits():
    images, _ = digits(256)
    torch.manual_seed(0)
    method = Jigsaw(
        build_backbone("resnet18", in_chans=1, small_image=True, width=8, stem_stride=2),
        grid=2,
        num_permutations=24,
        tile_dim=32,
        hidden_dim=128,
    )
    method.optimizer = {**Jigsaw.optimizer, "base_lr": 0.5}  # the digits params' 0.1 at batch 256, for batch 32
    before, after = twenty_steps_lower_the_loss(method, images)
    assert after < before - 0.05, (before, after)


def test_export_keeps_the_backbone_only_and_it_loads_in_torchvision(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", train=16, test=16)
    state = export_loads_in_torchvision("jigsaw", tmp_path, shards)
    assert any(k.startswith("classifier.") for k in state) and any(k.startswith("tile_embed.") for k in state)
