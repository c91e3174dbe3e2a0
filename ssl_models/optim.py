"""Optimizers and learning-rate schedules of the SSL recipes.

* LARS (You et al. 2017), as SimCLR/BYOL/VICReg/Barlow Twins use it: SGD with momentum whose per-layer step is
  scaled by the trust ratio ``eta * ||w|| / (||g|| + wd * ||w||)``; biases and normalisation parameters are
  excluded from both weight decay and the adaptation.
* AdamW (MAE, DINO, ViTs) and SGD, with the same decay exclusions.
* lr scaling: ``lr = base_lr * effective_batch / 256`` (linear, Goyal et al. 2017) or ``base_lr * sqrt(B / 256)``.
* linear warmup then cosine decay, per optimisation step.

``build_optimizer(model, recipe, effective_batch)`` turns a recipe dict (a method's ``optimizer`` class attribute
overridden by params) into an optimizer; ``build_scheduler(optimizer, total_steps=, warmup_steps=)`` adds the
schedule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

# keys a recipe may carry: optimizer keys, plus schedule keys build_optimizer leaves to the caller/scheduler
OPTIMIZER_KEYS = {"name", "base_lr", "weight_decay", "momentum", "betas", "eps", "eta", "lr_scaling", "nesterov"}
SCHEDULE_KEYS = {"warmup_epochs", "warmup_steps", "final_lr_ratio", "schedule"}
LR_SCALING_RULES = ("linear", "sqrt", "none")


def scaled_lr(base_lr: float, effective_batch: int, rule: str = "linear") -> float:
    """The lr for the global batch: linear ``base_lr * B / 256``, ``sqrt``: ``base_lr * sqrt(B / 256)``, or none."""
    if rule == "linear":
        return base_lr * effective_batch / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(effective_batch / 256)
    if rule == "none":
        return base_lr
    raise ValueError(f"lr_scaling must be one of {', '.join(LR_SCALING_RULES)}, got {rule!r}")


def _is_excluded(name: str, param: Tensor, extra: set[str]) -> bool:
    # biases and norm scales/shifts are 1-D; class/mask tokens are named by the module (no_weight_decay())
    return param.ndim <= 1 or name.split(".")[-1] in extra or name in extra


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups of trainable parameters: weights (decayed, LARS-adapted) and biases/norms/tokens (neither).

    A submodule may name extra parameters to exclude with a ``no_weight_decay()`` method returning names (like
    the ViT's ``cls_token``).
    """
    extra: set[str] = set()
    for module in model.modules():
        if hasattr(module, "no_weight_decay") and callable(module.no_weight_decay):
            extra |= set(module.no_weight_decay())
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if _is_excluded(name, p, extra) else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "lars_exclude": False})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman & Ginsburg 2017, arXiv 1708.03888).

    For each parameter w with gradient g in a group without ``lars_exclude``:
        g <- g + wd * w;   g <- g * eta * ||w|| / ||g||   (when both norms are > 0)
    then SGD momentum: v <- momentum * v + g;  w <- w - lr * v.
    Groups with ``lars_exclude=True`` (biases, norms) take the plain momentum step without decay or trust ratio.
    (``||g + wd w||`` is the combined norm, as in SimCLR's and BYOL's implementations.)
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        lars_exclude: bool = False,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        super().__init__(
            params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=lars_exclude)
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"]:
                        g = g.add(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    g = g * trust
                state = self.state[p]
                if group["momentum"]:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = g.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(g)
                    g = buf
                p.add_(g, alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, recipe: dict[str, Any], effective_batch: int) -> torch.optim.Optimizer:
    """Optimizer for ``model``'s trainable parameters from a recipe dict.

    recipe keys: name (lars | adamw | sgd), base_lr, weight_decay, lr_scaling (linear | sqrt | none; default
    linear), and per optimizer momentum (0.9), eta (LARS trust coefficient, 0.001), nesterov (SGD), betas
    ((0.9, 0.999); MAE uses (0.9, 0.95)), eps. Schedule keys (warmup_epochs, warmup_steps, final_lr_ratio,
    schedule) are allowed and ignored here. Each group's ``initial_lr`` is the scaled lr, which
    :func:`build_scheduler` multiplies by the warmup/cosine factor.
    """
    unknown = sorted(set(recipe) - OPTIMIZER_KEYS - SCHEDULE_KEYS)
    if unknown:
        raise ValueError(f"optimizer recipe: unknown key(s) {', '.join(unknown)}")
    name = recipe.get("name", "lars")
    if "base_lr" not in recipe:
        raise ValueError("optimizer recipe: base_lr is required")
    lr = scaled_lr(float(recipe["base_lr"]), int(effective_batch), recipe.get("lr_scaling", "linear"))
    weight_decay = float(recipe.get("weight_decay", 0.0))
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("optimizer: the model has no trainable parameters")
    if name == "lars":
        opt: torch.optim.Optimizer = LARS(
            groups,
            lr=lr,
            momentum=float(recipe.get("momentum", 0.9)),
            weight_decay=weight_decay,
            eta=float(recipe.get("eta", 0.001)),
        )
    elif name == "adamw":
        betas = tuple(float(b) for b in recipe.get("betas", (0.9, 0.999)))
        for g in groups:
            g.pop("lars_exclude")
        opt = torch.optim.AdamW(
            groups, lr=lr, betas=betas, eps=float(recipe.get("eps", 1e-8)), weight_decay=weight_decay
        )
    elif name == "sgd":
        for g in groups:
            g.pop("lars_exclude")
        opt = torch.optim.SGD(
            groups,
            lr=lr,
            momentum=float(recipe.get("momentum", 0.9)),
            nesterov=bool(recipe.get("nesterov", False)),
            weight_decay=weight_decay,
        )
    else:
        raise ValueError(f"optimizer recipe: unknown name {name!r} (lars, adamw, sgd)")
    for g in opt.param_groups:
        g["initial_lr"] = lr
    return opt


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0, final_ratio: float = 0.0) -> float:
    """lr factor at ``step``: linear from 1/warmup to 1 over ``warmup_steps``, then cosine to ``final_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / decay_steps, 0.0), 1.0)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    final_lr_ratio: float = 0.0,
    last_step: int = -1,
) -> LambdaLR:
    """Per-step linear warmup + cosine decay (call ``scheduler.step()`` after every ``optimizer.step()``).

    ``last_step`` resumes a schedule (the index of the last step already taken).
    """
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"scheduler: need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
    return LambdaLR(
        optimizer,
        lambda s: warmup_cosine(s, total_steps, min(warmup_steps, total_steps), final_lr_ratio),
        last_epoch=last_step,
    )
