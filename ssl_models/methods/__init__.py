"""Built-in methods, one file each; importing this package registers them with :mod:`ssl_models.registry`."""

# The Cookbook's four families:
#   deep metric learning            simclr, moco (v3), nnclr
#   self-distillation               byol, simsiam, dino, ibot
#   canonical correlation analysis  vicreg, barlowtwins, swav
#   masked image modeling           mae, simmim, ijepa (predicts representations, not pixels)
# isort: off
from . import barlowtwins, byol, dino, mae, moco, nnclr, simclr, simmim, simsiam, swav, vicreg  # noqa: F401

# The origins of SSL (the pretext tasks before them), by the Cookbook's category:
#   information restoration         colorization, inpainting, denoising_ae
#   spatial context                 rotnet, jigsaw
#   grouping                        deepcluster
from . import colorization, deepcluster, denoising_ae, inpainting, jigsaw, rotnet  # noqa: F401,E402
from . import ibot, ijepa  # noqa: F401,E402
# isort: on
