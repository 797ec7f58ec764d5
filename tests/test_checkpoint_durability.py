"""Checkpoints survive SIGKILL at any moment (issue 16, item 6): fsync before the rename, a manifest written last,
the newest *complete* checkpoint resumed (a damaged one skipped with one warning line), leftovers of a killed save
cleaned, and the counts of the checkpoint config validated."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .checkpoint_probe import ProbeLoop, assert_bitwise, train
from .train_helpers import REPO, train_env


@pytest.fixture(scope="module")
def three_saves(tmp_path_factory):
    """A run with checkpoints after steps 1, 2 and 3, and its final weights."""
    out = tmp_path_factory.mktemp("durable") / "run"
    return out, train(out, steps=3, every=1, keep=3, resume="none")


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _damage(checkpoint: Path, kind: str) -> None:
    if kind == "truncated":
        data = (checkpoint / "optimizer.bin").read_bytes()
        (checkpoint / "optimizer.bin").write_bytes(data[: len(data) // 2])
    elif kind == "flipped byte":
        data = bytearray((checkpoint / "rank0.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (checkpoint / "rank0.pt").write_bytes(bytes(data))
    elif kind == "no manifest":  # killed before its manifest was written (older code renamed it anyway)
        (checkpoint / "manifest.json").unlink()
    elif kind == "half deleted":  # a deletion cut short that kept the checkpoint's name
        for name in ("optimizer.bin", "random_states_0.pkl"):
            (checkpoint / name).unlink()


@pytest.mark.parametrize("kind", ["truncated", "flipped byte", "no manifest", "half deleted"])
def test_a_damaged_newest_checkpoint_is_skipped_with_one_warning(three_saves, tmp_path, capfd, kind):
    run, straight = three_saves
    copy = _copy(run, tmp_path)
    _damage(copy / "checkpoint-00000003", kind)
    capfd.readouterr()
    loop = ProbeLoop(str(copy), {"steps": "3", "keep": "3", "resume": "latest"})
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint-00000003" in warnings[0], err
    assert loop.state["step"] == 2
    assert loop.train() == 0
    assert_bitwise(straight, torch.load(copy / "final.pt", weights_only=True))


def test_a_named_damaged_checkpoint_is_refused_in_one_line(three_saves, tmp_path):
    from sana_sr.train.checkpoint import CheckpointError

    copy = _copy(three_saves[0], tmp_path)
    _damage(copy / "checkpoint-00000002", "truncated")
    with pytest.raises(CheckpointError) as refused:
        ProbeLoop(str(tmp_path / "out"), {"steps": "3", "resume": str(copy / "checkpoint-00000002")})
    message = str(refused.value)
    assert "\n" not in message and "optimizer.bin" in message and "bytes" in message, message


def test_leftovers_of_a_killed_save_are_cleaned(three_saves, tmp_path):
    """A killed save leaves hidden folders: an unfinished `.tmp` (deleted), a folder on its way out (`.old`,
    deleted), and a finished `.tmp` that missed only its rename (a re-save killed after its old copy moved aside):
    that one is the newest complete checkpoint and is resumed."""
    copy = _copy(three_saves[0], tmp_path)
    unfinished = copy / ".checkpoint-00000004.tmp"
    unfinished.mkdir()
    (unfinished / "optimizer.bin").write_bytes(b"half")
    shutil.copytree(copy / "checkpoint-00000001", copy / ".checkpoint-00000001.old")
    os.replace(copy / "checkpoint-00000003", copy / ".checkpoint-00000003.tmp")
    loop = ProbeLoop(str(copy), {"steps": "3", "keep": "3", "resume": "latest"})
    assert loop.state["step"] == 3
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in copy.glob("checkpoint-*")) == [f"checkpoint-0000000{i}" for i in (1, 2, 3)]


def test_every_file_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced: set[tuple[int, int]] = set()
    renames: list[Path] = []
    fsync, replace, rename = os.fsync, os.replace, os.rename

    def record_fsync(fd):
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        return fsync(fd)

    def check_rename(original):
        def wrapped(src, dst, *args, **kwargs):
            src = Path(src)
            if re.fullmatch(r"\.checkpoint-\d{8}\.tmp", src.name):
                paths = [src, *src.rglob("*")]
                unsynced = [p.name for p in paths if (p.stat().st_dev, p.stat().st_ino) not in synced]
                assert not unsynced, f"renamed {src.name} before fsyncing {unsynced}"
                renames.append(src)
            return original(src, dst, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", check_rename(replace))
    monkeypatch.setattr(os, "rename", check_rename(rename))
    train(tmp_path / "run", steps=2, every=1, resume="none")
    assert len(renames) == 2


@pytest.mark.parametrize("key", ["keep_last", "every_steps"])
def test_checkpoint_counts_are_validated(key):
    from sana_sr.train.config import ConfigError, load_config

    for value in (0, -1):
        with pytest.raises(ConfigError, match=rf"checkpoint\.{key} must be >= 1.*got {value}"):
            load_config(None, [f"checkpoint.{key}={value}"])


def _probe(out: Path, *options: str, kill_at: int | None = None, events: Path | None = None):
    env = train_env(**({"PROBE_KILL_AT": str(kill_at)} if kill_at else {}),
                    **({"PROBE_EVENTS": str(events)} if events else {}))
    cmd = [sys.executable, "-m", "tests.checkpoint_probe", str(out), "steps=8", "every=1", "keep=2", *options]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def _check_resumed_step(stdout: str, done: int) -> int:
    """The step a run resumed at is the newest complete checkpoint: the last save seen to finish, or the one after
    it when the kill fell between its rename and the line saying so."""
    resumed = re.search(r"resumed from .* at step (\d+)", stdout)
    step = int(resumed.group(1)) if resumed else 0
    assert done <= step <= done + 1, (done, stdout[-2000:])
    return step


@pytest.mark.slow
def test_sigkill_at_random_moments_of_checkpoint_writing_resumes_bitwise(tmp_path):
    """Five runs, each SIGKILLed at a random file-system event of its checkpoint writes (a file half written, a
    deletion half done, before or after an fsync or a rename), each resuming the last; every resume starts by
    saving its step again (as a stop signal right after a resume would), so kills land in re-saves too. The run
    that finally completes ends bitwise equal to one never interrupted."""
    count = tmp_path / "events"
    straight = _probe(tmp_path / "straight", "resume=none", events=count)
    assert straight.returncode == 0, straight.stderr[-3000:]
    per_save = int(count.read_text()) // 8
    rng = random.Random(16)
    out, done = tmp_path / "killed", 0  # done: the newest step whose save was seen to finish
    for attempt in range(5):
        kill_at = rng.randint(1, 2 * per_save)  # within this run's first two saves (the re-save and the next)
        killed = _probe(out, "resume=latest", "resave=1", kill_at=kill_at)
        assert killed.returncode == -9, f"kill {attempt} at event {kill_at}: exit {killed.returncode}\n" + (
            killed.stderr[-3000:])
        done = _check_resumed_step(killed.stdout, done)
        saved = [int(s) for s in re.findall(r"probe: saved step (\d+)", killed.stdout)]
        done = max([done, *saved])
        where = re.search(r"SIGKILL at event \d+ \((\S+)", killed.stdout).group(1)
        print(f"kill {attempt}: event {kill_at} ({where}) of ~{per_save} per save; saves completed: {saved}")
    final = _probe(out, "resume=latest", "resave=1")
    assert final.returncode == 0, final.stderr[-3000:]
    _check_resumed_step(final.stdout, done)
    assert_bitwise(torch.load(tmp_path / "straight" / "final.pt", weights_only=True),
                   torch.load(out / "final.pt", weights_only=True))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".checkpoint-")]
