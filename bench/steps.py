"""One training step per method, three ways: the project's, lightly's building blocks, and the bare backbone.

* ``project``: the method from ``ssl_models.registry`` with its constructor defaults, the method's optimizer recipe
  (``ssl_models.optim.build_optimizer`` / ``build_scheduler``) and the engine's own step
  (``Trainer._train_step``: forward under the engine's autocast, backward, optimizer, scheduler, the method's
  hooks), with the engine's CPU settings (deterministic algorithms, as ``Trainer.fit`` sets them).
* ``lightly``: the same method assembled the way lightly 1.6's examples do it from ``lightly.loss``,
  ``lightly.models.modules`` heads, ``lightly.models.utils`` (momentum updates, masking, patchify) and
  ``lightly.utils`` (LARS, cosine schedules), with the head sizes and hyperparameters of the project's defaults
  so both sides do the same arithmetic work; the optimizer recipe is the project's (same optimizer family, lr,
  weight decay), built from lightly's LARS where the recipe is LARS.
* ``bare``: the backbone alone, forward + backward over the same views (no heads, no loss, no optimizer): the
  physical limit of a step with this backbone.

Both method sides get the same torchvision ResNet-18 (``stem="standard"``: torchvision's 7x7 stride-2 stem and
max-pool; ``"small"``: the 3x3 stride-1 CIFAR stem without max-pool), and for MAE a ViT-Tiny with patch 4 (the
project's ``vit_tiny``; lightly's ``MAEBackbone`` built from a torchvision ViT of the same size). The views are
made once by the project's augmentation recipe for the method and given to every side, so augmentation is
outside the step.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

METHODS = ("simclr", "byol", "vicreg", "barlowtwins", "dino", "swav", "moco", "nnclr", "simsiam", "mae")
SIDES = ("project", "lightly", "bare")


@dataclass
class Side:
    """A ready-to-train side: ``step(views, step_index) -> loss`` runs one full optimisation step."""

    name: str
    model: nn.Module
    backbone: nn.Module
    step: Callable[[list[Tensor], int], float]

    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


# --------------------------------------------------------------------------------------------- shared pieces
def method_class(method: str):
    import ssl_models.methods  # noqa: F401  (registers the eleven methods)
    from ssl_models import registry

    return registry.get(method).cls


def hparams(method: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The project's constructor defaults for ``method``, with ``overrides``."""
    from ssl_models import registry

    method_class(method)
    values = dict(registry.get(method).defaults())
    values.update(overrides or {})
    return values


def recipe(method: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    rec = dict(method_class(method).optimizer)
    rec.update(overrides or {})
    return rec


def is_vit_method(method: str) -> bool:
    return method == "mae"


def vit_config(image_size: int, channels: int) -> dict[str, Any]:
    return {"name": "vit_tiny", "image_size": image_size, "patch_size": 4, "in_chans": channels}


def torchvision_resnet18(stem: str, channels: int) -> nn.Module:
    """torchvision's ResNet-18 without its classifier (fc = Identity), the stem as asked."""
    import torchvision

    net = torchvision.models.resnet18()
    if stem == "small":
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net


def project_backbone(
    method: str, stem: str, image_size: int, channels: int, backbone_cfg: dict[str, Any] | None = None
) -> nn.Module:
    """The project's backbone for a method: ``backbone_cfg`` (a pipeline ``build_backbone`` config) when given,
    else the ResNet-18 of the stem asked (width 64) or, for ViT methods, ViT-Tiny with patch 4."""
    from ssl_models.backbones import build_backbone

    if backbone_cfg is not None:
        kw = {k: v for k, v in backbone_cfg.items() if k != "name"}
        if backbone_cfg["name"].startswith("vit"):
            kw.setdefault("image_size", image_size)
        return build_backbone(backbone_cfg["name"], in_chans=channels, **kw)
    if is_vit_method(method):
        return build_backbone(**vit_config(image_size, channels))
    return build_backbone("resnet18", in_chans=channels, small_image=stem == "small", width=64)


def amp(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_views(method: str, images: Tensor, *, channels: int, image_size: int, seed: int = 0) -> list[Tensor]:
    """The method's views of ``images`` (uint8 B x C x H x W) by the project's augmentation recipe (per batch)."""
    from bench.viewpath import view_generator, view_maker

    maker = view_maker(method_class(method).augment, image_size=image_size, channels=channels)
    return maker(images, view_generator(seed, 0, 0, 0))


# --------------------------------------------------------------------------------------------- project
def project_side(
    method: str,
    *,
    stem: str = "standard",
    image_size: int = 32,
    channels: int = 3,
    total_steps: int = 1000,
    warmup_steps: int = 0,
    batch_size: int = 256,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    overrides: dict[str, Any] | None = None,
    recipe_overrides: dict[str, Any] | None = None,
    backbone_cfg: dict[str, Any] | None = None,
) -> tuple[Side, Any]:
    """(Side, Trainer): the project's method, optimizer recipe and engine step (``backbone_cfg``: see
    :func:`project_backbone`)."""
    from ssl_models.engine import Runtime, TrainConfig, Trainer
    from ssl_models.optim import build_optimizer, build_scheduler

    device = torch.device(device)
    backbone = project_backbone(method, stem, image_size, channels, backbone_cfg)
    model = method_class(method)(backbone, **hparams(method, overrides))
    rec = recipe(method, recipe_overrides)
    optimizer = build_optimizer(model, rec, batch_size)
    scheduler = build_scheduler(optimizer, total_steps=total_steps, warmup_steps=warmup_steps)
    config = TrainConfig(epochs=1, steps_per_epoch=total_steps, precision=precision, progress=False)
    trainer = Trainer(
        model,
        optimizer,
        config=config,
        make_loader=lambda epoch: (),
        scheduler=scheduler,
        runtime=Runtime(device=device),
    )
    model.on_train_start(total_steps)
    model.train()

    def step(views: list[Tensor], index: int) -> float:
        loss, _ = trainer._train_step(views, index, total_steps)
        return float(loss)

    return Side("project", model, backbone, step), trainer


# --------------------------------------------------------------------------------------------- lightly
class _LightlyModel(nn.Module):
    """Holds a lightly-built method's modules (so .to(), .train() and parameter counts see all of them)."""


def _lightly_optimizer(model: nn.Module, rec: dict[str, Any], batch_size: int, total_steps: int, warmup_steps: int):
    from lightly.models.utils import get_weight_decay_parameters
    from lightly.utils.lars import LARS
    from lightly.utils.scheduler import CosineWarmupScheduler

    from ssl_models.optim import scaled_lr

    lr = scaled_lr(float(rec["base_lr"]), batch_size, rec.get("lr_scaling", "linear"))
    wd = float(rec.get("weight_decay", 0.0))
    decay, no_decay = get_weight_decay_parameters([model])
    decay = [p for p in decay if p.requires_grad]
    no_decay = [p for p in no_decay if p.requires_grad]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    if rec["name"] == "lars":
        opt = LARS(
            groups,
            lr=lr,
            momentum=float(rec.get("momentum", 0.9)),
            weight_decay=wd,
            trust_coefficient=float(rec.get("eta", 0.001)),
        )
    elif rec["name"] == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=wd, betas=tuple(rec.get("betas", (0.9, 0.999))))
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=float(rec.get("momentum", 0.9)), weight_decay=wd)
    # lightly's schedule: linear warmup then cosine to end_value x lr
    sched = CosineWarmupScheduler(opt, warmup_epochs=warmup_steps, max_epochs=total_steps, end_value=0.0)
    return opt, sched


def lightly_side(
    method: str,
    *,
    stem: str = "standard",
    image_size: int = 32,
    channels: int = 3,
    total_steps: int = 1000,
    warmup_steps: int = 0,
    batch_size: int = 256,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    overrides: dict[str, Any] | None = None,
    recipe_overrides: dict[str, Any] | None = None,
    backbone_cfg: dict[str, Any] | None = None,
) -> Side:
    """The method from lightly's building blocks, sized like the project's defaults (see the module docstring).

    ``backbone_cfg`` (the pipeline's ``build_backbone`` config, for the mnist5k workload): a ResNet is the project's
    module itself (same architecture on both sides; lightly's heads sit on its pooled features); a ViT sets the
    depth, patch size and pooling (``global_pool: mean``: the mean of the patch tokens) of lightly's ViT.
    """
    from lightly import loss as L
    from lightly.models import utils as U
    from lightly.models.modules import heads as H
    from lightly.utils.scheduler import cosine_schedule

    device = torch.device(device)
    hp = hparams(method, overrides)
    m = _LightlyModel()
    vit_cfg = dict(backbone_cfg or {}) if is_vit_method(method) else {}
    if is_vit_method(method):
        m.backbone = None  # set below
    elif backbone_cfg is not None:
        from ssl_models.backbones import build_backbone

        m.backbone = build_backbone(
            backbone_cfg["name"], in_chans=channels, **{k: v for k, v in backbone_cfg.items() if k != "name"}
        )
    else:
        m.backbone = torchvision_resnet18(stem, channels)
    feat = getattr(m.backbone, "feature_dim", 512)

    def momentum_copy(module: nn.Module) -> nn.Module:
        twin = copy.deepcopy(module)
        U.deactivate_requires_grad(twin)
        return twin

    # forward(views, step) -> loss; after(step) -> momentum updates etc.; before_backward/after_backward hooks
    forward: Callable[[list[Tensor], int], Tensor]

    def after_step(step: int) -> None:
        return None

    def after_backward(step: int) -> None:
        return None

    if method == "simclr":
        m.head = H.SimCLRProjectionHead(
            feat, hp["projector_hidden_dim"], hp["projection_dim"], num_layers=hp["projector_layers"], batch_norm=True
        )
        crit = L.NTXentLoss(temperature=hp["temperature"])

        def forward(views, step):
            z0, z1 = (m.head(m.backbone(v).flatten(1)) for v in views[:2])
            return crit(z0, z1)

    elif method in ("byol", "moco"):
        if method == "byol":  # lightly has no DirectPred: its BYOL always trains the MLP predictor
            m.head = H.BYOLProjectionHead(feat, hp["projector_hidden_dim"], hp["projection_dim"])
            m.predictor = H.BYOLPredictionHead(hp["projection_dim"], hp["predictor_hidden_dim"], hp["projection_dim"])
            crit = L.NegativeCosineSimilarity()
        else:  # MoCo v3: 3-layer BN projector, BYOL-style predictor, contrastive loss against the momentum keys
            m.head = H.MoCoProjectionHead(
                feat, hp["projector_hidden_dim"], hp["projection_dim"], num_layers=3, batch_norm=True
            )
            m.predictor = H.BYOLPredictionHead(hp["projection_dim"], hp["predictor_hidden_dim"], hp["projection_dim"])
            crit = L.NTXentLoss(temperature=hp["temperature"])
        m.backbone_m = momentum_copy(m.backbone)
        m.head_m = momentum_copy(m.head)

        def forward(views, step):
            p0, p1 = (m.predictor(m.head(m.backbone(v).flatten(1))) for v in views[:2])
            with torch.no_grad():
                z0, z1 = (m.head_m(m.backbone_m(v).flatten(1)).detach() for v in views[:2])
            return 0.5 * (crit(p0, z1) + crit(p1, z0))

        def after_step(step):
            mom = cosine_schedule(step, total_steps, hp["base_momentum"], hp["final_momentum"])
            U.update_momentum(m.backbone, m.backbone_m, m=mom)
            U.update_momentum(m.head, m.head_m, m=mom)

    elif method == "vicreg":
        m.head = H.VICRegProjectionHead(feat, hp["expander_dim"], hp["expander_dim"], num_layers=hp["expander_layers"])
        crit = L.VICRegLoss(lambda_param=hp["sim_coeff"], mu_param=hp["std_coeff"], nu_param=hp["cov_coeff"])

        def forward(views, step):
            z0, z1 = (m.head(m.backbone(v).flatten(1)) for v in views[:2])
            return crit(z0, z1)

    elif method == "barlowtwins":
        m.head = H.BarlowTwinsProjectionHead(feat, hp["projector_hidden_dim"], hp["projection_dim"])
        crit = L.BarlowTwinsLoss(lambda_param=hp["lambda_offdiag"])

        def forward(views, step):
            z0, z1 = (m.head(m.backbone(v).flatten(1)) for v in views[:2])
            return crit(z0, z1)

    elif method == "simsiam":
        m.head = H.SimSiamProjectionHead(feat, hp["projector_hidden_dim"], hp["projection_dim"])
        m.predictor = H.SimSiamPredictionHead(hp["projection_dim"], hp["predictor_hidden_dim"], hp["projection_dim"])
        crit = L.NegativeCosineSimilarity()

        def forward(views, step):
            z0, z1 = (m.head(m.backbone(v).flatten(1)) for v in views[:2])
            p0, p1 = m.predictor(z0), m.predictor(z1)
            return 0.5 * (crit(z0.detach(), p1) + crit(z1.detach(), p0))

    elif method == "nnclr":
        from lightly.models.modules import NNMemoryBankModule

        m.head = H.NNCLRProjectionHead(feat, hp["projector_hidden_dim"], hp["projection_dim"])
        m.predictor = H.NNCLRPredictionHead(hp["projection_dim"], hp["predictor_hidden_dim"], hp["projection_dim"])
        m.memory_bank = NNMemoryBankModule(size=(hp["support_set_size"], hp["projection_dim"]))
        crit = L.NTXentLoss(temperature=hp["temperature"])

        def forward(views, step):
            z0, z1 = (m.head(m.backbone(v).flatten(1)) for v in views[:2])
            p0, p1 = m.predictor(z0), m.predictor(z1)
            nn0 = m.memory_bank(z0.detach(), update=False)
            nn1 = m.memory_bank(z1.detach(), update=True)
            return 0.5 * (crit(nn0, p1) + crit(nn1, p0))

    elif method == "dino":
        freeze_steps = int(hp["freeze_last_layer_frac"] * total_steps)
        m.head = H.DINOProjectionHead(
            feat, hp["head_hidden_dim"], hp["bottleneck_dim"], hp["out_dim"], freeze_last_layer=freeze_steps
        )
        m.backbone_m = momentum_copy(m.backbone)
        # a weight-normalised layer cannot be deep-copied: a second head, as lightly's DINO example builds it
        m.head_m = H.DINOProjectionHead(feat, hp["head_hidden_dim"], hp["bottleneck_dim"], hp["out_dim"])
        m.head_m.load_state_dict(m.head.state_dict())
        U.deactivate_requires_grad(m.head_m)
        warm = max(1, int(hp["warmup_teacher_temperature_frac"] * total_steps))
        crit = L.DINOLoss(
            output_dim=hp["out_dim"],
            warmup_teacher_temp=hp["warmup_teacher_temperature"],
            teacher_temp=hp["teacher_temperature"],
            warmup_teacher_temp_epochs=warm,
            student_temp=hp["student_temperature"],
            center_momentum=hp["center_momentum"],
        )
        n_global = hp["num_global_crops"]

        def forward(views, step):
            with torch.no_grad():
                teacher = [m.head_m(m.backbone_m(v).flatten(1)) for v in views[:n_global]]
            student = [m.head(m.backbone(v).flatten(1)) for v in views]
            return crit(teacher, student, epoch=min(step, warm))

        def after_backward(step):
            m.head.cancel_last_layer_gradients(current_epoch=step)

        def after_step(step):
            mom = cosine_schedule(step, total_steps, hp["base_momentum"], hp["final_momentum"])
            U.update_momentum(m.backbone, m.backbone_m, m=mom)
            U.update_momentum(m.head, m.head_m, m=mom)

    elif method == "swav":
        m.head = H.SwaVProjectionHead(feat, hp["projector_hidden_dim"], hp["projection_dim"])
        m.prototypes = H.SwaVPrototypes(
            hp["projection_dim"],
            hp["num_prototypes"],
            n_steps_frozen_prototypes=int(hp["freeze_prototypes_frac"] * total_steps),
        )
        crit = L.SwaVLoss(
            temperature=hp["temperature"],
            sinkhorn_iterations=hp["sinkhorn_iterations"],
            sinkhorn_epsilon=hp["sinkhorn_epsilon"],
        )
        n_high = hp["num_assignment_crops"]

        def forward(views, step):
            m.prototypes.normalize()
            out = [m.prototypes(F.normalize(m.head(m.backbone(v).flatten(1)), dim=1), step) for v in views]
            return crit(out[:n_high], out[n_high:])

    elif method == "mae":
        import torchvision
        from lightly.models.modules.masked_autoencoder import MAEBackbone, MAEDecoder

        patch = int(vit_cfg.get("patch_size", 4))
        vit = torchvision.models.VisionTransformer(
            image_size=image_size,
            patch_size=patch,
            num_layers=int(vit_cfg.get("depth", 12)),
            num_heads=3,
            hidden_dim=192,
            mlp_dim=768,
        )
        if channels != 3:
            vit.conv_proj = nn.Conv2d(channels, 192, kernel_size=patch, stride=patch)
        m.backbone = MAEBackbone.from_vit(vit)
        seq = vit.seq_length
        dim = hp["decoder_dim"]
        m.decoder = MAEDecoder(
            seq_length=seq,
            num_layers=hp["decoder_depth"],
            num_heads=hp["decoder_heads"],
            embed_input_dim=192,
            hidden_dim=dim,
            mlp_dim=4 * dim,
            out_dim=patch * patch * channels,
        )
        m.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        mask_ratio = hp["mask_ratio"]

        def forward(views, step):
            images = views[0]
            b = images.shape[0]
            idx_keep, idx_mask = U.random_token_mask(size=(b, seq), mask_ratio=mask_ratio, device=images.device)
            encoded = m.backbone.encode(images, idx_keep)
            tokens = U.repeat_token(m.mask_token, (b, seq))
            tokens = U.set_at_index(tokens, idx_keep, m.decoder.embed(encoded).type_as(tokens))
            decoded = m.decoder.decode(tokens)
            prediction = m.decoder.predict(U.get_at_index(decoded, idx_mask))
            target = U.get_at_index(U.patchify(images, patch), idx_mask - 1)
            if hp["norm_pix_loss"]:
                target = U.normalize_mean_var(target, dim=-1)
            return F.mse_loss(prediction, target)
    else:
        raise ValueError(f"no lightly step for {method!r}")

    m.to(device)
    m.train()
    opt, sched = _lightly_optimizer(m, recipe(method, recipe_overrides), batch_size, total_steps, warmup_steps)

    def step(views: list[Tensor], index: int) -> float:
        views = [v.to(device, non_blocking=True) for v in views]
        with amp(device, precision):
            loss = forward(views, index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        after_backward(index)
        opt.step()
        sched.step()
        after_step(index)
        return float(loss.detach())

    backbone = m.backbone
    if not is_vit_method(method) and backbone_cfg is None:
        backbone = _FlatFeatures(m.backbone)
    elif vit_cfg.get("global_pool") == "mean":
        backbone = _MeanPatchTokens(m.backbone)
    return Side("lightly", m, backbone, step)


class _MeanPatchTokens(nn.Module):
    """(B, D) features of lightly's MAE backbone: the mean of the patch tokens (the class token left out)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.encode(x)[:, 1:].mean(dim=1)


class _FlatFeatures(nn.Module):
    """(B, 512) features from a lightly-style backbone (torchvision ResNet with fc = Identity)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.feature_dim = 512

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten(1)


# --------------------------------------------------------------------------------------------- bare
def bare_side(
    method: str,
    *,
    stem: str = "standard",
    image_size: int = 32,
    channels: int = 3,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    **_: Any,
) -> Side:
    """The backbone's forward + backward over the same views (one forward per same-size group), nothing else."""
    device = torch.device(device)
    backbone = project_backbone(method, stem, image_size, channels).to(device).train()

    def step(views: list[Tensor], index: int) -> float:
        views = [v.to(device, non_blocking=True) for v in views]
        groups: dict[tuple, list[Tensor]] = {}
        for v in views:
            groups.setdefault(tuple(v.shape[-2:]), []).append(v)
        backbone.zero_grad(set_to_none=True)
        with amp(device, precision):
            total = sum(backbone(torch.cat(g)).float().pow(2).mean() for g in groups.values())
        total.backward()
        return float(total.detach())

    return Side("bare", backbone, backbone, step)


def engine_cpu_mode() -> None:
    """Switch on the CPU settings ``Trainer.fit`` trains under, for timing the project's step outside ``fit``:
    deterministic algorithms, without the NaN-filling of every new tensor that deterministic mode adds by default
    (the engine turns that off; left on, it costs the project's step 13-19% that a real run does not pay)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def build_side(side: str, method: str, **kwargs: Any) -> Side:
    if side == "project":
        return project_side(method, **kwargs)[0]
    if side == "lightly":
        return lightly_side(method, **kwargs)
    if side == "bare":
        return bare_side(method, **kwargs)
    raise ValueError(f"unknown side {side!r}; one of {', '.join(SIDES)}")
