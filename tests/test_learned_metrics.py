"""The learned metrics through the real pyiqa code path, with no download: every weight file pyiqa and torchvision
look for is written into a temporary cache first (random backbones of the right architecture; the LPIPS and DISTS
heads that the `lpips` and `DISTS_pytorch` wheels ship). Our wrapper (sana_sr/evaluation/metrics/learned.py) must
give the numbers that the authors' own packages give on the same pixels, so a wrong value range, channel order or
layout in it fails here. Needs the `test` extra (pyiqa, lpips, DISTS_pytorch); nothing is installed at test time."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from sana_sr.evaluation.metrics import MetricSuite, parse_metrics
from sana_sr.evaluation.metrics.learned import image_metric
from sana_sr.evaluation.metrics.niqe import niqe, params_path

from .conftest import PHOTOS

pyiqa = pytest.importorskip("pyiqa", reason="pyiqa is in the `test` extra: pip install -e '.[test]'")
torchvision = pytest.importorskip("torchvision")
pytestmark = pytest.mark.slow  # building and loading the networks takes a minute on 2 cores
CPU = torch.device("cpu")


def _basename(url: str) -> str:
    return os.path.basename(url.split("?")[0])


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A torch hub dir holding what `create_metric` loads for lpips, dists, musiq and niqe."""
    from pyiqa.archs import dists_arch, lpips_arch, musiq_arch, niqe_arch
    from pyiqa.utils import download_util
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    hub = tmp_path_factory.mktemp("hub")
    (hub / "checkpoints").mkdir()
    (hub / "pyiqa").mkdir()
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(alexnet, hub / "checkpoints" / _basename(AlexNet_Weights.IMAGENET1K_V1.url))
    vgg = torchvision.models.vgg16(weights=None)
    # DISTS reads only the convolutions; the 120M classifier weights are stored as one broadcast zero.
    state = {k: (v if k.startswith("features") else torch.zeros(1).expand(v.shape)) for k, v in vgg.state_dict().items()}
    torch.save(state, hub / "checkpoints" / _basename(VGG16_Weights.IMAGENET1K_V1.url))
    import DISTS_pytorch
    import lpips

    shutil.copy(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth",
                hub / "pyiqa" / _basename(lpips_arch.default_model_urls["0.1_alex"]))
    shutil.copy(Path(DISTS_pytorch.__file__).parent / "weights.pt",
                hub / "pyiqa" / _basename(dists_arch.default_model_urls["url"]))
    musiq = musiq_arch.MUSIQ(pretrained=False, num_class=1).state_dict()
    torch.save(musiq, hub / "pyiqa" / _basename(musiq_arch.default_model_urls["koniq10k"]))
    with np.load(params_path()) as p:  # the release's pristine model, as pyiqa's .mat stores it
        scipy.io.savemat(hub / "pyiqa" / _basename(niqe_arch.default_model_urls["url"]),
                         {"mu_prisparam": p["mu_pris_param"], "cov_prisparam": p["cov_pris_param"]})
    previous = torch.hub.get_dir(), download_util.DEFAULT_CACHE_DIR
    torch.hub.set_dir(str(hub))
    download_util.DEFAULT_CACHE_DIR = str(hub / "pyiqa")
    try:
        yield hub
    finally:
        torch.hub.set_dir(previous[0])
        download_util.DEFAULT_CACHE_DIR = previous[1]


def _pair(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A real photo crop and a degraded copy, RGB (H, W, 3) in [0, 1] on 8-bit levels."""
    with Image.open(PHOTOS[0]) as im:
        hr = im.convert("RGB").crop((0, 0, size, size))
    sr = hr.resize((size // 4, size // 4), Image.Resampling.BICUBIC).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(sr, dtype=np.float64) / 255, np.asarray(hr, dtype=np.float64) / 255


def _nchw(rgb: np.ndarray) -> torch.Tensor:
    """The reference layout, built independently of our wrapper: torchvision's to_tensor of the 8-bit image."""
    from torchvision.transforms.functional import to_tensor

    return to_tensor(Image.fromarray(np.round(rgb * 255).astype(np.uint8)))[None]


def test_lpips_equals_the_authors_package(weights):
    import lpips

    sr, hr = _pair()
    ours = image_metric("lpips", CPU)
    reference = lpips.LPIPS(net="alex", verbose=False).eval()  # same backbone file, its own heads and code
    with torch.no_grad():
        expected = reference(_nchw(sr) * 2 - 1, _nchw(hr) * 2 - 1).item()  # the package takes [-1, 1]
        wrong_range = reference(_nchw(sr), _nchw(hr)).item()
        wrong_channels = reference(_nchw(sr).flip(1) * 2 - 1, _nchw(hr) * 2 - 1).item()
    assert ours(sr, hr) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # The comparison can tell a wrong range or channel order apart, and the metric is symmetric with LPIPS(x, x) = 0.
    assert abs(wrong_range - expected) > 1e-3 and abs(wrong_channels - expected) > 1e-3
    assert ours(hr, sr) == pytest.approx(ours(sr, hr), rel=1e-6) and ours(hr, hr) == pytest.approx(0.0, abs=1e-7)


def test_dists_equals_the_authors_package(weights):
    from DISTS_pytorch import DISTS

    sr, hr = _pair()
    ours = image_metric("dists", CPU)
    reference = DISTS().eval()  # the authors' code: [0, 1] input, same VGG16 file, the alpha/beta it ships
    with torch.no_grad():
        expected = reference(_nchw(sr), _nchw(hr)).item()
        wrong_range = reference(_nchw(sr) * 2 - 1, _nchw(hr) * 2 - 1).item()
    assert ours(sr, hr) == pytest.approx(expected, rel=1e-5)
    assert abs(wrong_range - expected) > 0.05 * expected  # random VGG features: small distances, still told apart
    assert ours(hr, sr) == pytest.approx(ours(sr, hr), rel=1e-5) and ours(hr, hr) == pytest.approx(0.0, abs=1e-6)


def test_musiq_through_pyiqa_sees_what_pyiqa_sees(weights):
    """Random MUSIQ weights: the number means nothing, but ours must be pyiqa's own on the reference tensor."""
    sr, _ = _pair(128)
    ours = image_metric("musiq", CPU)
    direct = pyiqa.create_metric("musiq", device=CPU)
    with torch.no_grad():
        expected = direct(_nchw(sr)).item()
        flipped = direct(_nchw(sr).flip(1)).item()
        transposed = direct(_nchw(sr).transpose(2, 3)).item()
    assert ours(sr, None) == pytest.approx(expected, rel=1e-5)
    assert abs(flipped - expected) > 1e-4 and abs(transposed - expected) > 1e-4


def test_the_suite_scores_with_the_loaded_metrics(weights):
    sr, hr = _pair()
    suite = MetricSuite(parse_metrics("lpips,musiq,niqe"), CPU, has_reference=True, crop_border=4)
    assert suite.available == ["lpips", "niqe", "musiq"] and suite.unavailable == {}
    values, problems = suite.score(sr, hr)
    assert values["lpips"] == pytest.approx(image_metric("lpips", CPU)(sr, hr)) and values["niqe"] is None
    assert problems and problems[0].startswith("niqe:")  # 96x96 is one block: no number, a reason


def test_pyiqa_default_niqe_is_the_grey_channel(weights):
    """pyiqa's `niqe` (what OSEDiff's script calls) reads YIQ's Y: the BT.601 grey of our `niqe_gray`, not the
    YCbCr Y of BasicSR's default. Its float64 arithmetic differs from BasicSR's float32 only through flat areas,
    which these natural crops avoid."""
    metric = pyiqa.create_metric("niqe", device=CPU)
    for photo in PHOTOS[:2]:
        with Image.open(photo) as im:
            rgb = np.asarray(im.convert("RGB").crop((0, 0, 288, 192)), dtype=np.float64) / 255
        theirs = metric(_nchw(rgb)).item()
        assert theirs == pytest.approx(niqe(rgb, "gray"), abs=2e-2), photo.name
        assert abs(theirs - niqe(rgb, "y")) > abs(theirs - niqe(rgb, "gray")), photo.name
