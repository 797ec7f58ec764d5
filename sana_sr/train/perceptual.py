"""LPIPS-VGG for the perceptual loss, or a clear error when its network is not available here.

The `lpips` wheel ships only its small linear heads; the VGG16 backbone is a torchvision download. A missing
backbone must stop the run at start with what to do, never turn into a silent zero loss.
"""

from __future__ import annotations

import torch


class MissingWeightsError(RuntimeError):
    """A network the config asks for is not available locally; the message says what to do."""


def load_lpips(device: torch.device) -> torch.nn.Module:
    """LPIPS-VGG (inputs in [-1, 1]), frozen, on `device`."""
    try:
        import lpips
    except Exception as e:  # ImportError, or torchvision failing to load beside this torch build
        raise MissingWeightsError(
            f"loss.lpips > 0 needs the `lpips` package and torchvision ({type(e).__name__}: {e}); "
            "install them with the VGG16 weights in $TORCH_HOME/hub/checkpoints, or set loss.lpips=0"
        ) from None
    try:
        net = lpips.LPIPS(net="vgg", verbose=False)
    except Exception as e:  # the VGG16 download fails offline
        raise MissingWeightsError(
            f"LPIPS-VGG weights are not available locally ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "put vgg16-397923af.pth in $TORCH_HOME/hub/checkpoints, or set loss.lpips=0"
        ) from None
    return net.to(device).eval().requires_grad_(False)
