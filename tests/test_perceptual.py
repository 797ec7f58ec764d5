"""The LPIPS loss (issue 14 item 7): `lpips` is in the `train` extra; a run that asks for it without the VGG16
weights stops at start with one line naming the file; with the weights present it is a frozen LPIPS-VGG."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sana_sr.train.config import load_config
from sana_sr.train.perceptual import MissingWeightsError, load_lpips, vgg16_checkpoint

from .train_helpers import REPO, train_env

# Runs the real entry point with every download failing as it does offline, whatever this machine's network.
OFFLINE_MAIN = """
import sys, urllib.error, torch.hub
def no_network(url, *args, **kwargs):
    raise urllib.error.URLError("[Errno 101] Network is unreachable")
torch.hub.download_url_to_file = no_network
from sana_sr.train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("preset", ["sana_0.6b", "sana_1.6b"])
def test_the_real_configs_ask_for_lpips(preset):
    assert load_config(REPO / "sana_sr" / "configs" / f"{preset}.yaml").loss.lpips == 2.0


@pytest.mark.slow  # the real entry point in a subprocess
def test_missing_vgg_weights_stop_the_run_at_start_with_one_line(tmp_path):
    pytest.importorskip("lpips", reason="lpips is in the `train` extra")
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", OFFLINE_MAIN, str(REPO / "sana_sr" / "configs" / "tiny.yaml"),
           f"output_dir={out}", f"data.shards={tmp_path / 'no-shards'}", "loss.lpips=2.0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=train_env(TORCH_HOME=str(tmp_path / "torch-home")))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: LPIPS-VGG needs the VGG16 weights "), lines
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints" / "vgg16-397923af.pth") in lines[0]
    assert "Network is unreachable" in lines[0] and "loss.lpips=0" in lines[0]
    assert not (out / "config.yaml").exists()  # stopped before the model, the data or the run folder


def test_without_the_package_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)
    with pytest.raises(MissingWeightsError, match=r"needs the `lpips` package .*\.\[train\]"):
        load_lpips(torch.device("cpu"))


@pytest.mark.slow  # a random VGG16 written and read back
def test_with_local_weights_it_is_a_frozen_lpips_vgg(tmp_path, monkeypatch):
    pytest.importorskip("lpips", reason="lpips is in the `train` extra")
    import torchvision

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    vgg = torchvision.models.vgg16(weights=None)
    # LPIPS reads only the convolutions; the 120M classifier weights are stored as one broadcast zero.
    state = {k: (v if k.startswith("features") else torch.zeros(1).expand(v.shape)) for k, v in vgg.state_dict().items()}
    vgg16_checkpoint().parent.mkdir(parents=True)
    torch.save(state, vgg16_checkpoint())
    net = load_lpips(torch.device("cpu"))
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    assert torch.equal(net.net.slice1[0].weight, vgg.features[0].weight)  # the backbone is the file's
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert net(x, x).abs().max() < 1e-6 and (net(x, x.flip(3)) > 0).all()
