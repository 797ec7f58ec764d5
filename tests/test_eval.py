"""`eval/realsr.py` end to end: 1 process vs 2 real gloo processes under `accelerate launch`, missing metric weights,
and the one-line errors for bad datasets."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sana_sr.atomic import MARKER
from sana_sr.evaluation import DatasetError, paired_dataset

from .conftest import PHOTOS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "eval" / "realsr.py"
METRIC_COLUMNS = ("psnr", "ssim", "niqe", "niqe_gray")
# pyiqa as it behaves with no weights in its cache and no network: its downloader raises on create_metric.
FAKE_PYIQA = '''
def create_metric(name, **kwargs):
    raise OSError(f"<urlopen error [Errno 101] Network is unreachable> downloading weights for {name}")
'''


def _load_main():
    spec = importlib.util.spec_from_file_location("eval_realsr", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def write_realsr_style_set(root: Path) -> list[str]:
    """Five real-photo crops: HR 192x192 (four NIQE blocks) as NAME_HR.png, LR 48x48 (x4 down + JPEG) as NAME_LR4.png."""
    (root / "test_HR").mkdir(parents=True)
    (root / "test_LR").mkdir()
    crops = [(p, (40, 40)) for p in PHOTOS] + [(PHOTOS[0], (250, 200))]
    names = []
    for i, (photo, (x, y)) in enumerate(crops):
        with Image.open(photo) as im:
            hr = im.convert("RGB").crop((x, y, x + 192, y + 192))
        lr = hr.resize((48, 48), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        lr.save(buffer, format="JPEG", quality=60)
        name = f"{photo.stem}{i}"
        hr.save(root / "test_HR" / f"{name}_HR.png")
        Image.open(buffer).save(root / "test_LR" / f"{name}_LR4.png")
        names.append(name)
    return names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], pythonpath: list[Path]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same evaluation by 1 process (pyiqa without weights) and by 2 `accelerate launch` CPU processes.

    OMP_NUM_THREADS=1 for both: torch's CPU kernels sum in a thread-count-dependent order, so identical numbers
    need the same number of threads per process (accelerate launch sets 1 for several processes anyway).
    """
    tmp = tmp_path_factory.mktemp("eval")
    names = write_realsr_style_set(tmp / "set")
    (tmp / "fake" / "pyiqa").mkdir(parents=True)
    (tmp / "fake" / "pyiqa" / "__init__.py").write_text(FAKE_PYIQA)
    args = ["--root", str(tmp / "set"), "--device", "cpu", "--grids", "2", "--metrics", "all"]
    one = _run([sys.executable, str(SCRIPT), *args, "-o", str(tmp / "one")], [tmp / "fake", REPO])
    two = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                str(SCRIPT), *args, "-o", str(tmp / "two")], [REPO])
    return {"names": names, "tmp": tmp, "one": one, "two": two}


@pytest.mark.slow
def test_two_processes_score_every_image_once_with_the_same_numbers(runs):
    tmp = runs["tmp"]
    assert runs["two"].returncode == 0, runs["two"].stderr[-3000:]
    assert runs["one"].returncode == 0, runs["one"].stderr[-3000:]
    one, two = _csv(tmp / "one" / "per_image.csv"), _csv(tmp / "two" / "per_image.csv")
    summary = json.loads((tmp / "two" / "summary.json").read_text())
    # Really two processes: world size 2, and rows computed by both ranks (images 0, 2, 4 on rank 0).
    assert summary["run"]["world_size"] == 2
    assert [r["rank"] for r in two] == ["0", "1", "0", "1", "0"]
    assert [r["index"] for r in two] == ["0", "1", "2", "3", "4"]
    assert sorted(r["name"] for r in two) == sorted(f"{n}_LR4" for n in runs["names"])  # each image once
    assert {r["rank"] for r in one} == {"0"}
    for a, b in zip(one, two):
        assert a["name"] == b["name"]
        for column in METRIC_COLUMNS:
            assert a[column] == b[column] != "", (a["name"], column, a[column], b[column])
    # The SR files (gathered to rank 0 and written there) are byte-identical too.
    for name in runs["names"]:
        assert (tmp / "one" / "sr" / f"{name}_LR4.png").read_bytes() == (tmp / "two" / "sr" / f"{name}_LR4.png").read_bytes()


@pytest.mark.slow
def test_outputs_describe_the_run(runs):
    out = runs["tmp"] / "two"
    summary = json.loads((out / "summary.json").read_text())
    # No --model: the shipped trained model, not random weights.
    assert summary["model"]["spec"] == "tiny-sr" and summary["model"]["preset"] is None
    assert summary["dataset"]["kind"] == "paired" and summary["dataset"]["images"] == 5
    assert summary["dataset"]["crop_border"] == 4
    assert summary["versions"]["torch"] and "CPU" in summary["run"]["device"]
    rows = _csv(out / "per_image.csv")
    for name in METRIC_COLUMNS:
        mean = np.mean([float(r[name]) for r in rows])
        assert summary["metrics"][name]["mean"] == pytest.approx(mean) and summary["metrics"][name]["images"] == 5
    table = (out / "results.md").read_text()
    assert "| PSNR (Y, dB) |" in table and "| NIQE (Y) |" in table and "| NIQE (grey) |" in table
    grids = sorted(p.name for p in (out / "grids").glob("*.png"))
    assert len(grids) == 2
    with Image.open(out / "grids" / grids[0]) as grid:
        assert grid.size == (3 * 192 + 2 * 4, 192)  # LQ | SR | HQ
    assert not [p for p in out.rglob(".*") if p.name != MARKER]  # no temporary leftovers (the ownership marker stays)


@pytest.mark.slow
def test_missing_metric_weights_are_reported_unavailable_with_exit_zero(runs):
    out = runs["tmp"] / "one"
    assert runs["one"].returncode == 0
    summary = json.loads((out / "summary.json").read_text())
    learned = {"lpips", "dists", "musiq", "maniqa", "clipiqa"}
    assert learned <= set(summary["unavailable"])
    for name in learned:
        assert "Network is unreachable" in summary["unavailable"][name], summary["unavailable"][name]
        assert name not in summary["metrics"]
    assert set(summary["metrics"]) == set(METRIC_COLUMNS)
    assert "fid" in summary["unavailable"]  # FID too: its weights fail the same way, at the end
    header = next(csv.reader(open(out / "per_image.csv")))
    assert not learned & set(header)
    table = (out / "results.md").read_text()
    assert "**LPIPS**" in table and "Network is unreachable" in table
    # Without pyiqa at all (the 2-process run here) the reason says so.
    reason = json.loads((runs["tmp"] / "two" / "summary.json").read_text())["unavailable"]["musiq"]
    assert "pyiqa is not installed" in reason or "could not load" in reason


# -- bad datasets: one line naming the files, exit code 2 ----------------------------------------------------
def _error(capsys, argv: list[str]) -> str:
    code = _load_main()(argv + ["--device", "cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _write(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 60, 30)).save(path)


def test_missing_or_empty_dataset(tmp_path, capsys):
    line = _error(capsys, ["--lr", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")])
    assert "nowhere" in line and "does not exist" in line
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    line = _error(capsys, ["--hr", str(tmp_path / "empty"), "--lr", str(tmp_path / "empty"), "-o", str(tmp_path / "o")])
    assert "empty" in line and "has no images" in line
    line = _error(capsys, ["--root", str(tmp_path / "empty"), "-o", str(tmp_path / "o")])
    assert "test_HR/+test_LR/" in line


def test_names_that_do_not_pair(tmp_path, capsys):
    for name in ("a", "b"):
        _write(tmp_path / "set" / "HR" / f"{name}.png", (64, 64))
    for name in ("a", "c"):
        _write(tmp_path / "set" / "LR" / f"{name}.png", (16, 16))
    line = _error(capsys, ["--root", str(tmp_path / "set"), "-o", str(tmp_path / "o")])
    assert "c.png" in line and "b.png" in line and "LR without HR" in line


def test_pairs_that_are_not_scale_apart(tmp_path, capsys):
    _write(tmp_path / "HR" / "ok.png", (64, 64))
    _write(tmp_path / "LR" / "ok.png", (16, 16))
    _write(tmp_path / "HR" / "bad.png", (64, 48))
    _write(tmp_path / "LR" / "bad.png", (20, 12))
    line = _error(capsys, ["--hr", str(tmp_path / "HR"), "--lr", str(tmp_path / "LR"), "-o", str(tmp_path / "o")])
    assert "1 of 2" in line and "bad.png 64x48 vs bad.png 20x12" in line and "x4 = 80x48" in line
    assert "ok.png" not in line
    # At x2 neither pair fits.
    line = _error(capsys, ["--hr", str(tmp_path / "HR"), "--lr", str(tmp_path / "LR"), "--scale", "2",
                           "-o", str(tmp_path / "o")])
    assert "2 of 2" in line


def test_public_naming_conventions_pair_up(tmp_path):
    # RealSR (Canon_001_HR / Canon_001_LR4), DRealSR (x_x1 / x_x4), classic sets (baby / babyx4, LR = floor(HR/4)).
    _write(tmp_path / "HR" / "Canon_001_HR.png", (64, 64))
    _write(tmp_path / "LR" / "Canon_001_LR4.png", (16, 16))
    _write(tmp_path / "HR" / "DSC_0001_x1.png", (64, 32))
    _write(tmp_path / "LR" / "DSC_0001_x4.png", (16, 8))
    _write(tmp_path / "HR" / "woman.png", (230, 174))
    _write(tmp_path / "LR" / "womanx4.png", (57, 43))
    dataset = paired_dataset(tmp_path / "HR", tmp_path / "LR", 4)
    assert [(s.lq.name, s.hq.name) for s in dataset.samples] == [
        ("Canon_001_LR4.png", "Canon_001_HR.png"), ("DSC_0001_x4.png", "DSC_0001_x1.png"), ("womanx4.png", "woman.png"),
    ]
    with pytest.raises(DatasetError, match="match the same name"):
        _write(tmp_path / "LR" / "Canon_001_x4.png", (16, 16))
        paired_dataset(tmp_path / "HR", tmp_path / "LR", 4)


def test_div2k_val_lq_is_generated_once_per_seed_and_cached(tmp_path, monkeypatch):
    """The real Real-ESRGAN degradation, seeded per image: generated once, cached, regenerated only when stale."""
    from sana_sr.evaluation import div2k

    calls = []
    real = div2k.degrade_one

    def counted(config, hq, seed):
        calls.append(seed)
        return real(config, hq, seed)

    monkeypatch.setattr(div2k, "degrade_one", counted)
    gt = tmp_path / "gt"
    gt.mkdir()
    for i, photo in enumerate(PHOTOS[:3]):
        with Image.open(photo) as im:
            im.convert("RGB").crop((0, 0, 64, 48)).save(gt / f"{i:04d}.png")
    first = div2k.prepare_lq(gt, tmp_path / "cache", 4, seed=7, progress=False)
    assert sorted(p.name for p in first.glob("*.png")) == ["0000.png", "0001.png", "0002.png"] and len(calls) == 3
    with Image.open(first / "0001.png") as im:
        assert im.size == (16, 12)
    before = (first / "0001.png").read_bytes()
    assert div2k.prepare_lq(gt, tmp_path / "cache", 4, seed=7, progress=False) == first and len(calls) == 3  # cached
    other = div2k.prepare_lq(gt, tmp_path / "cache", 4, seed=8, progress=False)
    assert other != first and (other / "0001.png").read_bytes() != before
    dataset = paired_dataset(gt, first, 4)
    assert [s.name for s in dataset.samples] == ["0000", "0001", "0002"]
    (gt / "0003.png").write_bytes((gt / "0000.png").read_bytes())  # a new GT file: regenerated, others unchanged
    again = div2k.prepare_lq(gt, tmp_path / "cache", 4, seed=7, progress=False)
    assert (again / "0001.png").read_bytes() == before and (again / "0003.png").is_file()
