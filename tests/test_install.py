"""The project works from a regular (non-editable) install: every command and the bundled assets come from the
installed package, from any working directory, never from the source checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # end to end through the real launchers: minutes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding a wheel-style install of the checkout; its dependencies are borrowed from this
    environment through a path line (a .pth that adds a folder, not a site dir: this environment's own editable
    install is not activated there)."""
    root = tmp_path_factory.mktemp("install")
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # Built from a copy: setuptools leaves build/ and *.egg-info beside the sources it builds.
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "runs", "__pycache__",
                                                                 ".pytest_cache", "wandb", ".venv"))
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(source)],
                   check=True, capture_output=True, text=True, cwd=root)
    return root / "venv" / "bin"


def run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_regular_install_runs_from_anywhere(installed, tmp_path):
    where = run(installed, "python", "-c", "import sana_sr, compress; print(sana_sr.__file__); print(compress.__file__)",
                cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert all(str(REPO) not in line and "site-packages" in line for line in where.stdout.splitlines()), where.stdout

    for args in (("sana-sr", "--help"), ("sana-sr", "quickstart", "--help"), ("sana-sr", "evaluate", "--help")):
        result = run(installed, *args, cwd=tmp_path)
        assert result.returncode == 0 and "usage" in result.stdout, (args, result.stderr[-2000:])

    # The bundled configs, DeepSpeed JSONs and assets are package data.
    files = run(installed, "python", "-c",
                "from sana_sr import bundled; print(bundled.config_file('tiny.yaml'), "
                "bundled.config_file('deepspeed_zero2.json'), len(bundled.train_photos()), bundled.TINY_BASE); "
                "print(len(bundled.held_out_photos()), *sorted(p.parent.name for p in bundled.TINY_SR.rglob('*.safetensors')))",
                cwd=tmp_path)
    assert files.returncode == 0 and "site-packages" in files.stdout, files.stderr
    # The shipped default model and the held-out crops are package data too: upscale below runs on them.
    assert files.stdout.splitlines()[-1] == "10 default_prompt transformer vae", files.stdout

    photo = tmp_path / "in" / "photo.png"
    photo.parent.mkdir()
    Image.open(REPO / "sana_sr" / "assets" / "real_lq" / "chip.png").crop((0, 0, 32, 24)).save(photo)
    result = run(installed, "sana-sr", "upscale", str(photo), "-o", str(tmp_path / "out"), "--device", "cpu",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(tmp_path / "out" / "photo.png") as out:
        assert out.size == (128, 96)
