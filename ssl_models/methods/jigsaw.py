"""Jigsaw puzzles (Noroozi & Favaro 2016, "Unsupervised Learning of Visual Representations by Solving Jigsaw
Puzzles", arXiv 1603.09246): spatial context; the image is cut into a grid of tiles, shuffled by one permutation
of a fixed set, and the network names the permutation."""

from __future__ import annotations

import functools
import itertools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..heads import build_mlp
from ..precision import float32_loss
from ..registry import register
from .base import SSLMethod


@functools.lru_cache(maxsize=8)
def hamming_permutations(num_tiles: int, count: int) -> np.ndarray:
    """``count`` permutations of ``num_tiles`` tiles chosen greedily for maximal Hamming distance (paper, sec. 3.2).

    Deterministic: start from the identity; then repeatedly add the permutation whose minimum Hamming distance to
    those chosen is largest (the first such in lexicographic order on ties). Returns (count x num_tiles) int64;
    row j is the permutation of class j: tile position p shows cell ``perm[p]`` of the image.
    Minimum pairwise Hamming distance of the sets this gives (tests/test_method_jigsaw.py checks the first two):
    2x2 grid, all 24 permutations: 2; 3x3 grid, 100 permutations: 6; 3x3, 1000 (the paper's size): 5. Choosing
    1000 of the 9! = 362,880 takes about 9 s (once per process).
    """
    all_perms = np.array(list(itertools.permutations(range(num_tiles))), dtype=np.int8)
    if not 1 <= count <= len(all_perms):
        raise ValueError(
            f"jigsaw: num_permutations must be in [1, {len(all_perms)}] for {num_tiles} tiles, got {count}"
        )
    chosen = [0]  # the identity is the lexicographically first permutation
    min_dist = (all_perms != all_perms[0]).sum(axis=1)
    for _ in range(count - 1):
        nxt = int(np.argmax(min_dist))
        chosen.append(nxt)
        min_dist = np.minimum(min_dist, (all_perms != all_perms[nxt]).sum(axis=1))
    return all_perms[chosen].astype(np.int64)


def min_hamming_distance(perms: np.ndarray) -> int:
    d = (perms[:, None, :] != perms[None, :, :]).sum(axis=2)
    np.fill_diagonal(d, perms.shape[1] + 1)
    return int(d.min())


def shuffle_tiles(
    images: Tensor,
    permutations: Tensor,
    labels: Tensor,
    *,
    grid: int,
    tile_size: int,
    jitter: bool = True,
    normalize_tiles: bool = True,
) -> Tensor:
    """Cut each image into grid x grid cells, crop a ``tile_size`` tile from each cell and shuffle the tiles.

    images (B, C, H, W), labels (B,): the permutation index of each image. Returns (B, grid**2, C, t, t): tile
    position p of image b holds cell ``permutations[labels[b], p]`` (cells in row-major order). Against
    shortcuts (paper, sec. 3.3): each tile sits at its own random offset within its cell, drawn per image and
    per cell (``jitter``: the gap between tiles hides edge continuity, and no two puzzles share the gaps), and
    each tile is normalised by its own mean and std (``normalize_tiles``: no low-level statistics shared across
    tiles).
    """
    b, c, h, w = images.shape
    cell = min(h, w) // grid
    if tile_size > cell:
        raise ValueError(f"jigsaw: tile_size {tile_size} exceeds the {cell}-pixel cells of a {grid}x{grid} grid")
    slack = cell - tile_size
    span = torch.arange(tile_size, device=images.device)
    cells = []
    for r in range(grid):
        for col in range(grid):
            block = images[:, :, r * cell : (r + 1) * cell, col * cell : (col + 1) * cell]
            if jitter and slack:
                dy, dx = torch.randint(0, slack + 1, (2, b, 1), device=images.device)
                rows = (dy + span).view(b, 1, tile_size, 1).expand(b, c, tile_size, cell)
                block = torch.gather(block, 2, rows)
                cols = (dx + span).view(b, 1, 1, tile_size).expand(b, c, tile_size, tile_size)
                cells.append(torch.gather(block, 3, cols))
            else:
                o = slack // 2
                cells.append(block[:, :, o : o + tile_size, o : o + tile_size])
    cells_t = torch.stack(cells, dim=1)  # B x T x C x t x t, row-major cells
    order = permutations[labels]  # B x T
    tiles = torch.gather(cells_t, 1, order[:, :, None, None, None].expand_as(cells_t))
    if normalize_tiles:
        mean = tiles.mean(dim=(2, 3, 4), keepdim=True)
        std = tiles.std(dim=(2, 3, 4), keepdim=True)
        tiles = (tiles - mean) / (std + 1e-5)
    return tiles


class PermutationLoss(nn.Module):
    """L = 1/N sum_i -log p(y_i | tiles of X_i shuffled by P_{y_i}): cross entropy over the permutation set."""

    @float32_loss
    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels)


@register("jigsaw", family="origins", category="spatial_context")
class Jigsaw(SSLMethod):
    """Context-free network: the shared backbone embeds every tile alone, the tile embeddings are concatenated
    in tile-position order and an MLP classifies the permutation (fc6/fc7/fc8 of the paper; dropped at export).

    Defaults (paper): a 3x3 grid, 1000 permutations of maximal Hamming distance, 64-px tiles of 85-px cells on
    255-px crops (here tile_size defaults to 3/4 of the cell), tile embedding 512 (the paper's fc6 is 1024),
    hidden 4096; SGD lr 0.01 at batch 256. On 28-32 px images the grid is a params choice: 2x2 leaves 14-16 px
    cells whose tiles still show a whole stroke or part, at the price of only 24 permutations (min distance 2);
    3x3 cuts 9-10 px cells, smaller than a digit's stroke structure. The project's digits override is 2x2.
    The evaluated feature is the backbone on the whole image (the paper reads conv layers on whole images too).
    """

    augment = "mim"
    optimizer: dict[str, Any] = {
        "name": "sgd",
        "base_lr": 0.01,
        "weight_decay": 5e-4,
        "momentum": 0.9,
        "lr_scaling": "linear",
        "warmup_epochs": 0,
    }
    default_backbone: dict[str, Any] = {"name": "resnet18", "small_image": True}

    def __init__(
        self,
        backbone: nn.Module,
        *,
        grid: int = 3,
        num_permutations: int = 1000,
        tile_ratio: float = 0.75,
        tile_dim: int = 512,
        hidden_dim: int = 4096,
        jitter: bool = True,
        normalize_tiles: bool = True,
    ) -> None:
        super().__init__()
        if grid < 2:
            raise ValueError(f"jigsaw: grid must be >= 2, got {grid}")
        if not 0.0 < tile_ratio <= 1.0:
            raise ValueError(f"jigsaw: tile_ratio must be in (0, 1], got {tile_ratio}")
        self.backbone = backbone
        self.grid, self.tile_ratio = grid, tile_ratio
        self.jitter, self.normalize_tiles = jitter, normalize_tiles
        self.register_buffer(
            "permutations", torch.from_numpy(hamming_permutations(grid * grid, num_permutations)), persistent=False
        )
        self.tile_embed = build_mlp([backbone.feature_dim, tile_dim], batch_norm=False)
        self.classifier = build_mlp([grid * grid * tile_dim, hidden_dim, num_permutations], batch_norm=True)
        self.criterion = PermutationLoss()

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        images = views[0]
        b = images.shape[0]
        cell = min(images.shape[-2:]) // self.grid
        tile = max(1, int(cell * self.tile_ratio))
        labels = torch.randint(0, self.permutations.shape[0], (b,), device=images.device)
        tiles = shuffle_tiles(
            images,
            self.permutations,
            labels,
            grid=self.grid,
            tile_size=tile,
            jitter=self.jitter,
            normalize_tiles=self.normalize_tiles,
        )
        t = tiles.shape[1]
        tile_features = self.tile_embed(self.backbone(tiles.flatten(0, 1)))  # (B T) x tile_dim
        logits = self.classifier(torch.relu(tile_features).reshape(b, t * tile_features.shape[-1]))
        loss = self.criterion(logits, labels)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
            embedding = self.backbone(images)  # what evaluation reads: the whole image
        return {"loss": loss, "embedding": embedding, "permutation_accuracy": accuracy}
