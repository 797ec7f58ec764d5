"""Resuming never runs code from a checkpoint (issue 16, item 1).

A crafted checkpoint carries a pickle whose `__reduce__` runs `touch MARKER`. It is planted in every kind of file a
resume reads, under DDP and under DeepSpeed, with the manifest re-sealed to match (an attacker writes a consistent
folder): each resume is refused with one line, and the marker never appears. A clean resume stays bitwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from .checkpoint_probe import ProbeLoop, assert_bitwise, train
from .slurm_cluster import free_ports
from .train_helpers import REPO, accelerate_launch, train_env


class Payload:
    """Unpickled without restriction, this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def plant(file: Path, marker: Path, raw: bool = False) -> None:
    """Replace `file` by a torch.save archive (or, `raw`, a bare pickle) whose unpickling runs the payload."""
    file.unlink(missing_ok=True)
    if raw:
        file.write_bytes(pickle.dumps({"state": Payload(marker)}))
    else:
        torch.save({"state": Payload(marker), "weights": torch.zeros(3)}, file)


def reseal(folder: Path) -> None:
    """Rewrite manifest.json to match the folder, as whoever crafted it would."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            files[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size,
                                                        "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    step = int(folder.name.split("-")[1])
    (folder / "manifest.json").write_text(json.dumps({"step": step, "world_size": 1, "files": files}))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    return out, train(out, steps=3, every=1, keep=10, resume="none")


# Every file of a DDP checkpoint that Accelerate or sana-sr unpickles on resume; pytorch_model.bin is what
# Accelerate falls back to when model.safetensors is absent, custom_checkpoint_0.pkl what it loads for registered
# objects.
DDP_FILES = ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "rank0.pt", "pytorch_model.bin",
             "custom_checkpoint_0.pkl"]


@pytest.mark.parametrize("name", DDP_FILES)
def test_ddp_resume_refuses_a_pickle_payload(ddp_run, tmp_path, name):
    from sana_sr.train.checkpoint import CheckpointError

    source, _ = ddp_run
    crafted = tmp_path / "crafted" / "checkpoint-00000002"
    shutil.copytree(source / "checkpoint-00000002", crafted)
    marker = tmp_path / "marker"
    if name == "pytorch_model.bin":
        (crafted / "model.safetensors").unlink()
    plant(crafted / name, marker)
    reseal(crafted)
    with pytest.raises(CheckpointError) as refused:
        ProbeLoop(str(tmp_path / "out"), {"steps": "3", "resume": str(crafted)})
    message = str(refused.value)
    assert "\n" not in message and name in message and "posix.system" in message, message
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["raw pickle", "trainer_state"])
def test_ddp_resume_refuses_other_crafted_files_in_one_line(ddp_run, tmp_path, damage):
    from sana_sr.train.checkpoint import CheckpointError

    source, _ = ddp_run
    crafted = tmp_path / "checkpoint-00000002"
    shutil.copytree(source / "checkpoint-00000002", crafted)
    marker = tmp_path / "marker"
    if damage == "raw pickle":  # not a torch.save archive: torch.load would take it as a legacy pickle
        plant(crafted / "optimizer.bin", marker, raw=True)
    else:
        (crafted / "trainer_state.json").write_text('["not", "a", "state"]')
    reseal(crafted)
    with pytest.raises(CheckpointError) as refused:
        ProbeLoop(str(tmp_path / "out"), {"steps": "3", "resume": str(crafted)})
    assert "\n" not in str(refused.value), str(refused.value)
    assert not marker.exists()


def test_ddp_resume_stays_bitwise(ddp_run, tmp_path):
    source, straight = ddp_run
    resumed = train(tmp_path / "resumed", steps=3, resume=source / "checkpoint-00000002")
    assert_bitwise(straight, resumed)


def test_every_torch_load_during_a_resume_is_weights_only(tmp_path):
    """The second line of defence, should a file change after the check: inside `weights_only_loading` even a
    caller that asks for weights_only=False (DeepSpeed's checkpoint engine) gets the restricted unpickler."""
    from sana_sr.train.checkpoint_files import CheckpointError, weights_only_loading

    marker, file = tmp_path / "marker", tmp_path / "mp_rank_00_model_states.pt"
    plant(file, marker)
    with pytest.raises(CheckpointError) as refused, weights_only_loading(tmp_path):
        torch.load(file, weights_only=False)
    assert "\n" not in str(refused.value) and "posix.system" in str(refused.value), str(refused.value)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored afterwards
    legit = tmp_path / "legit.pt"
    torch.save({"w": torch.ones(2)}, legit)
    with weights_only_loading(tmp_path):
        assert torch.equal(torch.load(legit, weights_only=False)["w"], torch.ones(2))


def _launch(out: Path, *options: str) -> subprocess.CompletedProcess:
    cmd = [*accelerate_launch(2, free_ports(1)[0], module="tests.checkpoint_probe"), str(out), "strategy=deepspeed",
           *options]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=train_env(), cwd=REPO)


@pytest.mark.slow
def test_deepspeed_resume_refuses_pickle_payloads_and_stays_bitwise(tmp_path):
    """ZeRO-2 on two CPU processes: DeepSpeed's engine would unpickle its model and optimizer states with
    weights_only=False; every file kind of its checkpoint is refused when it carries a payload."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from sana_sr.train.checkpoint_files import CheckpointError, check_unpickling, weights_only_loading

    straight = _launch(tmp_path / "a", "steps=3", "every=1", "keep=10", "resume=none")
    assert straight.returncode == 0, straight.stderr[-3000:]
    source = tmp_path / "a" / "checkpoint-00000002"
    kinds = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.suffix in (".pt", ".bin", ".pkl"))
    assert "pytorch_model/mp_rank_00_model_states.pt" in kinds and "rank1.pt" in kinds, kinds
    assert any("optim_states" in k for k in kinds), kinds

    # Through the real launcher: the payload in the model states DeepSpeed loads first.
    crafted = tmp_path / "crafted" / "checkpoint-00000002"
    shutil.copytree(source, crafted)
    marker = tmp_path / "marker"
    plant(crafted / "pytorch_model" / "mp_rank_00_model_states.pt", marker)
    reseal(crafted)
    refused = _launch(tmp_path / "b", "steps=3", f"resume={crafted}")
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode != 0 and len(errors) == 1, refused.stderr[-3000:]
    assert "mp_rank_00_model_states.pt" in errors[0] and "posix.system" in errors[0], errors
    assert not marker.exists()

    # Every other file kind, checked as rank 0 does before any load.
    for kind in kinds:
        copy = tmp_path / kind.replace("/", "_") / "checkpoint-00000002"
        shutil.copytree(source, copy)
        plant(copy / kind, marker)
        with pytest.raises(CheckpointError, match=kind.split("/")[-1]):
            check_unpickling(copy)
        # And DeepSpeed's own loader, should a file change after that check.
        with pytest.raises(CheckpointError), weights_only_loading(copy):
            TorchCheckpointEngine().load(str(copy / kind), map_location="cpu")
    assert not marker.exists()

    resumed = _launch(tmp_path / "c", "steps=3", f"resume={source}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_bitwise(torch.load(tmp_path / "a" / "final.pt", weights_only=True),
                   torch.load(tmp_path / "c" / "final.pt", weights_only=True))
