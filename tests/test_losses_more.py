"""The losses of MoCo v3, NNCLR, SimSiam, DINO, Barlow Twins, SwAV and SimMIM against loop-based references.

Each reference below is a direct transcription of the paper's equation with Python loops over samples and
dimensions (floats and ``math``, no tensor algebra), evaluated on fixed small tensors; the library's vectorised
losses must agree to 1e-5. Limit cases check the values the formulas predict for identical views and collapsed
(constant) embeddings, and that the batch order does not matter. The 2-process gloo tests at the end check that
the gathered losses equal one process on the concatenated batch (loss and gradients), with slice A's harness.
"""
from __future__ import annotations

import math

import pytest
import torch

from support.dist_utils import assert_matches_single, gathered_loss_case, gathered_loss_worker, run_distributed
from ssl_models.methods.barlowtwins import BarlowTwinsLoss
from ssl_models.methods.dino import DINOLoss, teacher_temperature_at
from ssl_models.methods.moco import MoCoV3Loss
from ssl_models.methods.nnclr import NNCLRLoss, SupportSet
from ssl_models.methods.simmim import MaskedL1Loss, block_mask
from ssl_models.methods.simsiam import NegativeCosineLoss
from ssl_models.methods.swav import SwAVLoss, sinkhorn_knopp

ATOL = 1e-5


def rows(t: torch.Tensor) -> list[list[float]]:
    return t.detach().double().tolist()


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def softmax(v: list[float]) -> list[float]:
    m = max(v)
    e = [math.exp(x - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ references
def ref_infonce(anchors: list[list[float]], candidates: list[list[float]], tau: float) -> float:
    """1/N sum_i -log(exp(a_i.c_i/tau) / sum_j exp(a_i.c_j/tau)), a and c l2-normalised."""
    a = [unit(v) for v in anchors]
    c = [unit(v) for v in candidates]
    total = 0.0
    for i in range(len(a)):
        denominator = sum(math.exp(dot(a[i], c[j]) / tau) for j in range(len(c)))
        total += -math.log(math.exp(dot(a[i], c[i]) / tau) / denominator)
    return total / len(a)


def ref_moco(q: list, k: list, tau: float) -> float:
    return 2 * tau * ref_infonce(q, k, tau)


def ref_negative_cosine(p: list, z: list) -> float:
    return -sum(dot(unit(a), unit(b)) for a, b in zip(p, z)) / len(p)


def ref_dino(student: list[list[list[float]]], teacher: list[list[list[float]]], center: list[float],
             tau_s: float, tau_t: float) -> float:
    total, pairs = 0.0, 0
    for i, t_crop in enumerate(teacher):
        for v, s_crop in enumerate(student):
            if v == i:
                continue
            ce = 0.0
            for t_row, s_row in zip(t_crop, s_crop):
                q = softmax([(x - c) / tau_t for x, c in zip(t_row, center)])
                p = softmax([x / tau_s for x in s_row])
                ce += -sum(qk * math.log(pk) for qk, pk in zip(q, p))
            total += ce / len(t_crop)
            pairs += 1
    return total / pairs


def ref_barlow(z1: list, z2: list, lam: float, eps: float) -> float:
    n, d = len(z1), len(z1[0])

    def standardise(z):
        out = [[0.0] * d for _ in range(n)]
        for j in range(d):
            mean = sum(z[b][j] for b in range(n)) / n
            var = sum((z[b][j] - mean) ** 2 for b in range(n)) / n
            for b in range(n):
                out[b][j] = (z[b][j] - mean) / math.sqrt(var + eps)
        return out

    a, b_ = standardise(z1), standardise(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[b][i] * b_[b][j] for b in range(n)) / n
            loss += (1 - c_ij) ** 2 if i == j else lam * c_ij ** 2
    return loss


def ref_sinkhorn(scores: list[list[float]], eps: float, iterations: int) -> list[list[float]]:
    """SwAV appendix A.1 written out: Q = exp(S/eps), total mass 1, then alternately every prototype 1/K and
    every sample 1/B; finally each sample's code sums to 1."""
    b, k = len(scores), len(scores[0])
    q = [[math.exp(s / eps) for s in row] for row in scores]
    total = sum(sum(row) for row in q)
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        for j in range(k):
            col = sum(q[i][j] for i in range(b))
            for i in range(b):
                q[i][j] /= col * k
        for i in range(b):
            row = sum(q[i])
            q[i] = [x / (row * b) for x in q[i]]
    return [[x * b for x in row] for row in q]


def ref_swav(scores: list[list[list[float]]], tau: float, eps: float, iterations: int, n_assign: int) -> float:
    loss = 0.0
    for s in range(n_assign):
        codes = ref_sinkhorn(scores[s], eps, iterations)
        sub = 0.0
        for t in range(len(scores)):
            if t == s:
                continue
            ce = 0.0
            for q_row, x_row in zip(codes, scores[t]):
                p = softmax([x / tau for x in x_row])
                ce += -sum(qk * math.log(pk) for qk, pk in zip(q_row, p))
            sub += ce / len(codes)
        loss += sub / (len(scores) - 1)
    return loss / n_assign


def ref_masked_l1(prediction: list, patches: list, mask: list) -> float:
    total, count = 0.0, 0
    for b in range(len(mask)):
        for n in range(len(mask[b])):
            if mask[b][n]:
                for y, x in zip(prediction[b][n], patches[b][n]):
                    total += abs(y - x)
                    count += 1
    return total / count


# ------------------------------------------------------------------------------------------------ MoCo v3
def test_moco_loss_matches_reference_and_keys_get_no_gradient():
    q, k = randn(6, 5, seed=1).requires_grad_(), randn(6, 5, seed=2).requires_grad_()
    loss = MoCoV3Loss(temperature=0.2)(q, k)
    assert loss.item() == pytest.approx(ref_moco(rows(q), rows(k), 0.2), abs=ATOL)
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None  # keys come from the momentum encoder: a constant for the loss


def test_moco_loss_limit_cases():
    tau = 0.2
    # constant embeddings: every key looks the same, each term is log N: 2 tau log N
    const = torch.ones(5, 4, dtype=torch.float64)
    assert float(MoCoV3Loss(tau)(const, const)) == pytest.approx(2 * tau * math.log(5), abs=ATOL)
    # identical views with orthogonal rows: 2 tau log(1 + (N-1) exp(-1/tau))
    eye = torch.eye(4, dtype=torch.float64)
    assert float(MoCoV3Loss(tau)(eye, eye)) == pytest.approx(2 * tau * math.log(1 + 3 * math.exp(-1 / tau)), abs=ATOL)
    # batch permutation
    q, k = randn(7, 5, seed=3), randn(7, 5, seed=4)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    assert float(MoCoV3Loss(tau)(q[perm], k[perm])) == pytest.approx(float(MoCoV3Loss(tau)(q, k)), abs=ATOL)


# ------------------------------------------------------------------------------------------------ NNCLR
def test_nnclr_loss_and_support_set_match_reference():
    support = SupportSet(size=8, dim=5).double()
    bank = randn(8, 5, seed=5)
    support.push(bank)
    z, p = randn(6, 5, seed=6), randn(6, 5, seed=7).requires_grad_()
    anchors = support.nearest(z)
    # nearest neighbour by cosine similarity, by hand
    bank_rows = [unit(v) for v in rows(bank)]
    for i, zi in enumerate(rows(z)):
        sims = [dot(unit(zi), b) for b in bank_rows]
        best = max(range(len(sims)), key=sims.__getitem__)
        assert anchors[i].tolist() == pytest.approx(bank_rows[best], abs=1e-12)
    assert not anchors.requires_grad
    loss = NNCLRLoss(temperature=0.1)(anchors, p)
    assert loss.item() == pytest.approx(ref_infonce(rows(anchors), rows(p), 0.1), abs=ATOL)
    loss.backward()
    assert p.grad.abs().sum() > 0


def test_nnclr_support_set_is_a_fifo_and_starts_empty():
    support = SupportSet(size=5, dim=3).double()
    z = randn(2, 3, seed=8)
    torch.testing.assert_close(support.nearest(z), torch.nn.functional.normalize(z, dim=1))  # empty: itself
    batches = [randn(2, 3, seed=10 + i) for i in range(4)]
    for b in batches:
        support.push(b)
    assert int(support.filled) == 5
    # 8 rows went in a queue of 5: the last 5 remain, the oldest overwritten first
    kept = torch.nn.functional.normalize(torch.cat(batches), dim=1)[-5:]
    assert sorted(map(tuple, support.queue.tolist())) == sorted(map(tuple, kept.tolist()))


def test_nnclr_loss_limit_cases():
    const = torch.ones(5, 4, dtype=torch.float64)
    assert float(NNCLRLoss(0.1)(const, const)) == pytest.approx(math.log(5), abs=ATOL)
    a, p = randn(6, 4, seed=9), randn(6, 4, seed=10)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert float(NNCLRLoss(0.1)(a[perm], p[perm])) == pytest.approx(float(NNCLRLoss(0.1)(a, p)), abs=ATOL)


# ------------------------------------------------------------------------------------------------ SimSiam
def test_simsiam_loss_matches_reference_and_stops_the_target_gradient():
    p1, p2 = randn(6, 5, seed=11).requires_grad_(), randn(6, 5, seed=12).requires_grad_()
    z1, z2 = randn(6, 5, seed=13).requires_grad_(), randn(6, 5, seed=14).requires_grad_()
    loss = NegativeCosineLoss()(p1, z1, p2, z2)
    expected = 0.5 * ref_negative_cosine(rows(p1), rows(z2)) + 0.5 * ref_negative_cosine(rows(p2), rows(z1))
    assert loss.item() == pytest.approx(expected, abs=ATOL)
    loss.backward()
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    assert z1.grad is None and z2.grad is None  # stop-gradient on the targets


def test_simsiam_loss_limit_cases():
    z = randn(5, 4, seed=15)
    assert float(NegativeCosineLoss()(z, z, z, z)) == pytest.approx(-1.0, abs=ATOL)  # identical: minimum -1
    const = torch.ones(5, 4, dtype=torch.float64)
    assert float(NegativeCosineLoss()(const, const, const, const)) == pytest.approx(-1.0, abs=ATOL)  # collapse too
    p1, z1, p2, z2 = (randn(6, 4, seed=s) for s in (16, 17, 18, 19))
    perm = torch.tensor([5, 4, 3, 0, 1, 2])
    permuted = NegativeCosineLoss()(p1[perm], z1[perm], p2[perm], z2[perm])
    assert float(permuted) == pytest.approx(float(NegativeCosineLoss()(p1, z1, p2, z2)), abs=ATOL)


# ------------------------------------------------------------------------------------------------ DINO
def test_dino_loss_matches_reference_and_updates_the_centre():
    k, b = 7, 4
    student = [randn(b, k, seed=20 + v).requires_grad_() for v in range(4)]  # 2 global + 2 local crops
    teacher = [randn(b, k, seed=30 + v).requires_grad_() for v in range(2)]
    criterion = DINOLoss(k, student_temperature=0.1, center_momentum=0.9).double()
    center = randn(1, k, seed=40)
    criterion.center.copy_(center)
    loss = criterion(student, teacher, teacher_temperature=0.05)
    expected = ref_dino([rows(s) for s in student], [rows(t) for t in teacher], rows(center)[0], 0.1, 0.05)
    assert loss.item() == pytest.approx(expected, abs=ATOL)
    # c <- 0.9 c + 0.1 * mean of the teacher outputs over both global crops
    all_rows = rows(teacher[0]) + rows(teacher[1])
    batch_mean = [sum(r[j] for r in all_rows) / len(all_rows) for j in range(k)]
    new_center = [0.9 * c + 0.1 * m for c, m in zip(rows(center)[0], batch_mean)]
    assert criterion.center[0].tolist() == pytest.approx(new_center, abs=1e-12)
    loss.backward()
    assert all(s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher)  # the teacher is a constant
    # evaluation mode leaves the centre alone
    criterion.eval()
    before = criterion.center.clone()
    criterion(student, teacher, teacher_temperature=0.05)
    torch.testing.assert_close(criterion.center, before)


def test_dino_loss_limit_cases():
    k = 6
    criterion = DINOLoss(k, student_temperature=0.1).double().eval()
    # constant logits: uniform teacher and student, every cross-entropy is ln K
    const = [torch.full((3, k), 2.0, dtype=torch.float64) for _ in range(3)]
    assert float(criterion(const, const[:2], teacher_temperature=0.04)) == pytest.approx(math.log(k), abs=ATOL)
    # identical crops, equal temperatures, zero centre: H(P, P) = entropy of P
    x = randn(4, k, seed=41)
    same = [x, x, x]
    entropy = sum(-sum(p * math.log(p) for p in softmax([v / 0.1 for v in row])) for row in rows(x)) / 4
    assert float(criterion(same, same[:2], teacher_temperature=0.1)) == pytest.approx(entropy, abs=ATOL)
    # batch permutation (the same permutation in every crop)
    student = [randn(5, k, seed=50 + v) for v in range(3)]
    teacher = [randn(5, k, seed=60 + v) for v in range(2)]
    perm = torch.tensor([4, 2, 0, 1, 3])
    permuted = criterion([s[perm] for s in student], [t[perm] for t in teacher], teacher_temperature=0.07)
    assert float(permuted) == pytest.approx(float(criterion(student, teacher, teacher_temperature=0.07)), abs=ATOL)


def test_dino_teacher_temperature_warms_up_linearly():
    at = [teacher_temperature_at(s, 100, start=0.04, end=0.07, warmup_frac=0.3) for s in (0, 15, 30, 99)]
    assert at == pytest.approx([0.04, 0.055, 0.07, 0.07])
    assert teacher_temperature_at(0, 100, start=0.04, end=0.07, warmup_frac=0.0) == 0.07


# ------------------------------------------------------------------------------------------------ Barlow Twins
def test_barlow_twins_loss_matches_reference():
    z1, z2 = randn(7, 4, seed=70), randn(7, 4, seed=71)
    criterion = BarlowTwinsLoss(lambda_offdiag=0.3)
    assert float(criterion(z1, z2)) == pytest.approx(ref_barlow(rows(z1), rows(z2), 0.3, 1e-5), abs=ATOL)


def test_barlow_twins_loss_limit_cases():
    d = 5
    # constant embeddings: standardised to 0, C = 0, every diagonal term is 1: L = D
    const = torch.full((6, d), 3.0, dtype=torch.float64)
    assert float(BarlowTwinsLoss(0.0051)(const, const)) == pytest.approx(d, abs=ATOL)
    # identical views: C_ii = var / (var + eps), so the invariance term is ~0 and only redundancy remains
    z = randn(8, d, seed=72)
    terms = BarlowTwinsLoss(0.0051).terms(z, z)
    assert float(terms["on_diagonal"]) < 1e-8
    assert float(terms["mean_diagonal_correlation"]) == pytest.approx(1.0, abs=1e-4)
    # decorrelated (whitened) identical views reach the minimum 0
    white = torch.linalg.qr(randn(8, d, seed=73) - randn(8, d, seed=73).mean(0))[0] * math.sqrt(8)
    white = white - white.mean(0)
    assert float(BarlowTwinsLoss(0.0051, eps=0.0)(white, white)) == pytest.approx(0.0, abs=1e-6)
    # batch permutation
    z1, z2 = randn(6, d, seed=74), randn(6, d, seed=75)
    perm = torch.tensor([1, 3, 5, 0, 2, 4])
    assert float(BarlowTwinsLoss()(z1[perm], z2[perm])) == pytest.approx(float(BarlowTwinsLoss()(z1, z2)), abs=ATOL)


# ------------------------------------------------------------------------------------------------ SwAV
def test_sinkhorn_matches_reference_and_balances_the_prototypes():
    scores = torch.nn.functional.normalize(randn(6, 4, seed=80), dim=1) @ \
        torch.nn.functional.normalize(randn(4, 4, seed=81), dim=1).T
    codes = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    expected = ref_sinkhorn(rows(scores), 0.05, 3)
    for got, want in zip(codes.tolist(), expected):
        assert got == pytest.approx(want, abs=ATOL)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(6, dtype=torch.float64))  # each sample: a distribution
    # many iterations: every prototype gets B/K of the mass (equipartition)
    balanced = sinkhorn_knopp(scores, epsilon=0.05, iterations=200)
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((4,), 6 / 4, dtype=torch.float64), atol=1e-4, rtol=0)


def test_sinkhorn_shared_rows_act_as_extra_samples():
    scores, queue = randn(5, 3, seed=82) * 0.3, randn(7, 3, seed=83) * 0.3
    with_queue = sinkhorn_knopp(scores, epsilon=0.05, iterations=3, shared_scores=queue)
    together = sinkhorn_knopp(torch.cat([queue, scores]), epsilon=0.05, iterations=3)[7:]
    torch.testing.assert_close(with_queue, together)


def test_swav_loss_matches_reference():
    crops = [randn(5, 4, seed=84 + v) * 0.5 for v in range(4)]  # 2 assignment crops + 2 local crops
    loss = SwAVLoss(temperature=0.1, sinkhorn_epsilon=0.05, sinkhorn_iterations=3)(crops)
    expected = ref_swav([rows(c) for c in crops], 0.1, 0.05, 3, n_assign=2)
    assert loss.item() == pytest.approx(expected, abs=ATOL)


def test_swav_loss_limit_cases_and_codes_get_no_gradient():
    k = 6
    # every sample scores every prototype the same (collapse): uniform codes and predictions, L = ln K
    const = [torch.full((4, k), 0.3, dtype=torch.float64) for _ in range(3)]
    assert float(SwAVLoss()(const)) == pytest.approx(math.log(k), abs=ATOL)
    crops = [(randn(6, k, seed=90 + v) * 0.5).requires_grad_() for v in range(3)]
    perm = torch.tensor([2, 5, 0, 1, 4, 3])
    loss = SwAVLoss()(crops)
    assert SwAVLoss()([c[perm] for c in crops]).item() == pytest.approx(loss.item(), abs=ATOL)
    # the gradient flows only through the predictions p_t, never through the codes: check against that recipe
    codes = [sinkhorn_knopp(c, epsilon=0.05, iterations=3) for c in crops[:2]]
    manual = 0.0
    for s, q in enumerate(codes):
        manual = manual + sum(-(q * torch.log_softmax(crops[t] / 0.1, dim=1)).sum(1).mean()
                              for t in range(3) if t != s) / 2
    manual = manual / 2
    g_loss = torch.autograd.grad(loss, crops)
    g_manual = torch.autograd.grad(manual, crops)
    for a, b in zip(g_loss, g_manual):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ SimMIM
def test_masked_l1_matches_reference_and_ignores_visible_patches():
    prediction, patches = randn(2, 6, 12, seed=100), randn(2, 6, 12, seed=101)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1]], dtype=torch.float64)
    loss = MaskedL1Loss()(prediction, patches, mask)
    assert loss.item() == pytest.approx(ref_masked_l1(rows(prediction), rows(patches), mask.tolist()), abs=ATOL)
    changed = prediction.clone()
    changed[mask == 0] += 5.0  # visible patches are not part of the task
    assert float(MaskedL1Loss()(changed, patches, mask)) == pytest.approx(loss.item(), abs=ATOL)
    assert float(MaskedL1Loss()(patches, patches, mask)) == 0.0  # perfect reconstruction
    perm = torch.tensor([1, 0])
    assert float(MaskedL1Loss()(prediction[perm], patches[perm], mask[perm])) == pytest.approx(loss.item(), abs=ATOL)


def test_block_mask_masks_whole_blocks_at_the_ratio():
    torch.manual_seed(0)
    mask = block_mask(16, (8, 8), block=2, mask_ratio=0.6).reshape(16, 8, 8)
    # 16 blocks of 2x2 patches, round(0.6 * 16) = 10 masked per sample
    assert mask.sum(dim=(1, 2)).tolist() == [40.0] * 16
    blocks = mask.reshape(16, 4, 2, 4, 2)
    assert torch.equal(blocks.amax(dim=(2, 4)), blocks.amin(dim=(2, 4)))  # constant within each block
    assert not torch.equal(mask[0], mask[1])  # random per sample
    odd = block_mask(3, (5, 5), block=2, mask_ratio=0.5)  # grid not a multiple of the block: cropped
    assert odd.shape == (3, 25)


# ------------------------------------------------------------------------------------------------ 2 processes
class MoCoCase(torch.nn.Module):
    """Symmetric MoCo v3 on (view 1, view 2): queries are the views, keys the same views detached."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        loss = MoCoV3Loss(temperature=0.2)
        return loss(a, b) + loss(b, a)


class NNCLRCase(torch.nn.Module):
    """Symmetric NNCLR with a fixed support set (the same on every rank) and the views as predictions."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        support = SupportSet(size=10, dim=a.shape[1]).double()
        support.push(randn(10, a.shape[1], seed=123))
        loss = NNCLRLoss(temperature=0.1)
        return 0.5 * (loss(support.nearest(a), b) + loss(support.nearest(b), a))


class SwAVCase(torch.nn.Module):
    """SwAV on three crops against 5 fixed prototypes, optionally with a queue shared by every rank."""

    def __init__(self, queue: bool = False) -> None:
        super().__init__()
        self.queue = queue

    def forward(self, *crops: torch.Tensor) -> torch.Tensor:
        prototypes = torch.nn.functional.normalize(randn(5, crops[0].shape[1], seed=321), dim=1)
        scores = [torch.nn.functional.normalize(c, dim=1) @ prototypes.T for c in crops]
        queued = None
        if self.queue:
            stored = torch.nn.functional.normalize(randn(2, 9, crops[0].shape[1], seed=322), dim=2)
            queued = [q @ prototypes.T for q in stored]
        return SwAVLoss(temperature=0.1, sinkhorn_epsilon=0.05, sinkhorn_iterations=3)(scores, queued)


class DINOCase(torch.nn.Module):
    """DINO with 3 student crops and the first 2 inputs (detached) as teacher crops."""

    def forward(self, *crops: torch.Tensor) -> torch.Tensor:
        criterion = DINOLoss(crops[0].shape[1], student_temperature=0.1).double()
        return criterion(list(crops), [c.detach() * 2 for c in crops[:2]], teacher_temperature=0.05)


GATHERED_CASES = [
    gathered_loss_case("test_losses_more:MoCoCase", batch=5, dim=6, seed=3),
    gathered_loss_case("test_losses_more:NNCLRCase", batch=5, dim=6, seed=4),
    gathered_loss_case("ssl_models.methods.barlowtwins:BarlowTwinsLoss", {"lambda_offdiag": 0.1}, batch=5, dim=6,
                       seed=5),
    gathered_loss_case("test_losses_more:SwAVCase", num_inputs=3, batch=6, dim=6, seed=6),
    gathered_loss_case("test_losses_more:SwAVCase", {"queue": True}, num_inputs=3, batch=6, dim=6, seed=7),
    gathered_loss_case("test_losses_more:DINOCase", num_inputs=3, batch=4, dim=6, seed=8),
]


def state_worker(rank: int, world_size: int, cases: list[dict]) -> dict:
    """The gathered-loss cases plus the states the methods share across ranks (support set, queue, centre)."""
    from ssl_models import distributed

    out = {"losses": gathered_loss_worker(rank, world_size, cases)}
    z = randn(world_size * 3, 4, seed=200)[rank * 3:(rank + 1) * 3]
    support = SupportSet(size=5, dim=4).double()
    support.push(distributed.gather_no_grad(z))  # what NNCLR.after_step does
    out["support_queue"] = support.queue.clone()
    criterion = DINOLoss(4).double()
    teacher = randn(world_size * 3, 4, seed=201)[rank * 3:(rank + 1) * 3]
    criterion.update_center(teacher)
    out["center"] = criterion.center.clone()
    return out


@pytest.mark.timeout(240)
def test_gathered_losses_and_shared_state_match_one_process():
    per_rank = run_distributed(state_worker, 2, (GATHERED_CASES,))
    # MoCo v3, NNCLR, Barlow Twins, SwAV (with and without a queue) and DINO over 2 gloo ranks equal one
    # process on the concatenated batch: rank-mean loss, DDP-averaged parameter gradients, input gradients
    assert_matches_single(GATHERED_CASES, [r["losses"] for r in per_rank], world_size=2, atol=1e-5)
    # every rank ends with the support set and the DINO centre one process computes from the global batch
    z_all = randn(6, 4, seed=200)
    single_support = SupportSet(size=5, dim=4).double()
    single_support.push(z_all)
    single_center = DINOLoss(4).double()
    single_center.update_center(randn(6, 4, seed=201))
    for r in per_rank:
        torch.testing.assert_close(r["support_queue"], single_support.queue)
        torch.testing.assert_close(r["center"], single_center.center)
