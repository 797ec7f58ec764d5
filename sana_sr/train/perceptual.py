"""LPIPS-VGG for the perceptual loss, or a one-line error at start when its network is not available here.

`lpips` is a dependency of the `train` extra, but its wheel ships only the small linear heads; the VGG16 backbone is
torchvision's ImageNet checkpoint, read from the torch hub cache or downloaded into it. A missing backbone must stop
the run before any training, naming the file and where it goes, never turn into a silent zero loss.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import warnings
from pathlib import Path

import torch

# A download that cannot connect must fail at start, not hang the job.
CONNECT_TIMEOUT_S = 20.0


class MissingWeightsError(ValueError):
    """A network the config asks for is not available locally; `str()` is the one-line reason and what to do."""


def vgg16_checkpoint() -> Path:
    """Where torchvision looks for the ImageNet VGG16 weights that LPIPS-VGG is built on."""
    from torchvision.models import VGG16_Weights

    name = os.path.basename(urllib.parse.urlparse(VGG16_Weights.IMAGENET1K_V1.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def load_lpips(device: torch.device) -> torch.nn.Module:
    """LPIPS-VGG (inputs in [-1, 1]), frozen, on `device`; MissingWeightsError when it cannot be built here."""
    try:
        import lpips
        import torchvision  # noqa: F401 - lpips needs it; a broken install fails here, not inside lpips
    except Exception as e:  # ImportError, or torchvision failing to load beside this torch build
        raise MissingWeightsError(
            f"loss.lpips > 0 needs the `lpips` package and torchvision ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "pip install -e '.[train]', or set loss.lpips=0"
        ) from None
    from torchvision.models import VGG16_Weights

    checkpoint = vgg16_checkpoint()
    if not checkpoint.is_file():
        # Fetched here rather than inside lpips, so that a failure is one line of ours and no progress bar.
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(CONNECT_TIMEOUT_S)
        try:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            # torchvision names its checkpoints NAME-<sha256 prefix>.pth; the download is checked against it.
            torch.hub.download_url_to_file(VGG16_Weights.IMAGENET1K_V1.url, str(checkpoint),
                                           hash_prefix=checkpoint.stem.rsplit("-", 1)[-1], progress=False)
        except Exception as e:  # offline: URLError, OSError, timeouts
            raise MissingWeightsError(
                f"LPIPS-VGG needs the VGG16 weights {checkpoint} and they are not there "
                f"(download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                f"copy {checkpoint.name} there (or set TORCH_HOME), or set loss.lpips=0"
            ) from None
        finally:
            socket.setdefaulttimeout(previous)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # lpips calls torchvision's deprecated `pretrained=`
        net = lpips.LPIPS(net="vgg", verbose=False)
    return net.to(device).eval().requires_grad_(False)
