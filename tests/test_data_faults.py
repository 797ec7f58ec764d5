"""Faults in training data end in one line, never a hang, and every bad sample is counted (issue 16 items 7, 8)."""

from __future__ import annotations

import io
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from sana_sr.data import make_loader
from sana_sr.data.samples import DataStreamError
from sana_sr.data.streaming import LoaderConfig

from .test_streaming import CROP, fake_rank, photo_crops, write_set, write_tar


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_an_all_bad_resampled_stream_stops_within_its_bound(monkeypatch, tmp_path):
    """prompt_embeds on shards written without embeddings: every sample is unusable, for ever."""
    write_set(tmp_path, [4, 4, 4, 4])
    fake_rank(monkeypatch, 0, 1)
    loader = make_loader(tmp_path, LoaderConfig(num_workers=2, crop_size=CROP, batch_size=2, prompt_embeds=True,
                                                max_bad_in_a_row=200))
    start = time.monotonic()
    with pytest.raises(DataStreamError) as error:
        next(iter(loader))
    assert time.monotonic() - start < 60
    message = str(error.value)
    assert "\n" not in message and "200 samples in a row were unusable" in message
    assert "no prompt embedding" in message and str(tmp_path / "s-0") in message  # the reason and the shards


def test_unreadable_shards_stop_the_stream_and_count_their_samples(monkeypatch, tmp_path):
    write_set(tmp_path, [3, 3])
    (tmp_path / "s-01.tar").write_bytes(b"not a tar at all")  # sizes.json says it holds 3
    fake_rank(monkeypatch, 0, 1)
    exact = make_loader(tmp_path, LoaderConfig(num_workers=0, crop_size=CROP, batch_size=2, mode="exact"),
                        degradation=None)
    batches = list(exact)
    assert sum(len(b["key"]) for b in batches) == 3 and exact.skipped == 3
    (tmp_path / "s-00.tar").write_bytes(b"")  # now nothing can be read: resampled must end, not spin
    resampled = make_loader(tmp_path, LoaderConfig(num_workers=0, crop_size=CROP, batch_size=2), degradation=None)
    with pytest.raises(DataStreamError, match="shards in a row gave no sample .*cannot open the shard"):
        next(iter(resampled))


def test_embeddings_of_another_width_or_shape_are_skipped_and_counted(monkeypatch, tmp_path):
    crops = iter(photo_crops(8, seed=3))
    widths = {"a0": (5, 8), "a1": (3, 8), "a2": (4, 6), "a3": (2, 3, 8), "a4": (0, 8), "a5": (7, 8)}
    members = []
    for key, shape in widths.items():
        members += [(f"{key}.jpg", next(crops)), (f"{key}.emb.npy", _npy(np.ones(shape, np.float16)))]
    write_tar(tmp_path / "s-00.tar", members)
    (tmp_path / "sizes.json").write_text(json.dumps({"s-00.tar": len(widths)}))
    fake_rank(monkeypatch, 0, 1)
    for dim in (8, None):  # the model's width, or the first sample's
        loader = make_loader(tmp_path, LoaderConfig(num_workers=0, crop_size=CROP, batch_size=2, mode="exact",
                                                    shuffle_buffer=0, prompt_embeds=True, prompt_dim=dim))
        batches = list(loader)
        assert [k for b in batches for k in b["key"]] == ["a0", "a1", "a5"]
        assert loader.skipped == 3
        assert {tuple(b["prompt_embeds"].shape[::2]) for b in batches if b["key"]} == {(2, 8), (1, 8)}


def test_shards_holding_no_samples_and_an_epoch_without_batches_are_errors(monkeypatch, tmp_path):
    from sana_sr.train.trainer import Trainer

    write_set(tmp_path, [2])
    (tmp_path / "sizes.json").write_text(json.dumps({"s-00.tar": 0}))
    fake_rank(monkeypatch, 0, 1)
    with pytest.raises(ValueError, match="hold no samples"):
        make_loader(tmp_path, LoaderConfig(num_workers=0, crop_size=CROP))
    # The trainer's stream: an epoch that yields nothing would make every later epoch empty too, a silent hang.
    trainer = SimpleNamespace(state={"epoch": 0, "batch_in_epoch": 0}, loader=[], loader_epoch=lambda epoch: None,
                              config=SimpleNamespace(data=SimpleNamespace(shards=str(tmp_path))))
    with pytest.raises(DataStreamError, match="epoch 0 gave no batch"):
        next(Trainer.batches(trainer))


@pytest.mark.slow
def test_a_stuck_loader_worker_times_out_in_one_line(monkeypatch):
    fake_rank(monkeypatch, 0, 1)
    loader = make_loader("pipe:sleep 20", LoaderConfig(num_workers=1, crop_size=CROP, batch_size=2, timeout_s=2,
                                                       epoch_samples=4), degradation=None)
    assert loader.loader.pipeline[0].timeout == 2  # the DataLoader inside the WebLoader
    start = time.monotonic()
    with pytest.raises(DataStreamError, match=r"no batch from the loader workers of rank 0 in 2 s .*pipe:sleep 20"):
        next(iter(loader))
    assert time.monotonic() - start < 30


STUCK_RANK = """
import sys, time, torch
from sana_sr.distributed import DistConfig, build_accelerator, collective_failed, exit_code, process_group_released
accelerator = build_accelerator(DistConfig(cpu=True, timeout_s=float(sys.argv[1])), 1, 1, 1.0)
if accelerator.process_index == 1:
    time.sleep(300)  # a stuck rank: rank 0's next collective must give up, not wait for the time limit
start = time.monotonic()
code = 0
with process_group_released():  # as sana_sr.train ends: the exit code survives the broken gloo group
    try:
        accelerator.reduce(torch.ones(1), "sum")
    except RuntimeError as e:
        print(f"gave up after {time.monotonic() - start:.1f} s: {collective_failed(e)}", flush=True)
        code = 3
sys.exit(exit_code(code))
"""


@pytest.mark.slow
def test_a_stuck_rank_ends_the_job_after_the_process_group_timeout(tmp_path):
    import subprocess
    import sys

    from .slurm_cluster import free_ports
    from .train_helpers import train_env

    port = free_ports(1)[0]
    procs = [subprocess.Popen([sys.executable, "-c", STUCK_RANK, "4"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=train_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    try:
        output, _ = procs[0].communicate(timeout=120)
    finally:
        for proc in procs:
            proc.kill()
    assert procs[0].returncode == 3, output[-2000:]
    assert float(output.split("gave up after ")[1].split(" s")[0]) < 4 + 20, output[-2000:]
    assert "s: True" in output, output[-2000:]  # recognised as a lost rank by sana_sr.train


def skip_shards(folder) -> None:
    """Shards of 2 good photo crops each, half of them led by a bad sample (too small for the crop): with batches of
    2 and no shuffling, every batch is one shard and carries its skip count (0 or 1)."""
    from PIL import Image

    from .train_helpers import write_photo_crops

    crops = sorted(write_photo_crops(folder / "images", per_photo=2).iterdir())
    small = io.BytesIO()
    Image.new("RGB", (16, 16)).save(small, "PNG")
    sizes = {}
    for s in range(len(crops) // 2):
        members = [(f"bad{s}.png", small.getvalue())] if s % 2 == 0 else []
        members += [(f"g{s}_{i}.png", crops[2 * s + i].read_bytes()) for i in range(2)]
        write_tar(folder / f"s-{s:02d}.tar", members)
        sizes[f"s-{s:02d}.tar"] = len(members)
    (folder / "sizes.json").write_text(json.dumps(sizes))


def true_skips(folder, seed: int, steps: int, epoch_samples: int) -> list[int]:
    """The bad samples each of 2 ranks meets in its first `steps` batches, read here by the loader itself."""
    config = LoaderConfig(batch_size=2, num_workers=1, crop_size=64, shuffle_buffer=0, shuffle_initial=0, seed=seed,
                          epoch_samples=epoch_samples)
    counts = []
    for rank in range(2):
        loader = make_loader(folder, config, degradation=None, rank=rank, world_size=2)
        batches = iter(loader)
        counts.append(sum(next(batches)["skipped"] for _ in range(steps)))
    return counts


@pytest.mark.slow
def test_the_skip_count_after_a_two_process_resume_is_the_true_count(tmp_path):
    from .slurm_cluster import free_ports
    from .train_helpers import REPO, TINY_ARGS, accelerate_launch, metrics, run

    shards, out = tmp_path / "shards", tmp_path / "run"
    skip_shards(shards)
    seed, epoch_samples = 2, 400
    truth3, truth6 = true_skips(shards, seed, 3, epoch_samples), true_skips(shards, seed, 6, epoch_samples)
    assert truth3[0] != truth3[1]  # else every rank restoring rank 0's count would look right
    args = [*TINY_ARGS, f"data.shards={shards}", "data.shuffle_buffer=0", f"data.seed={seed}",
            f"data.epoch_samples={epoch_samples}", "optim.global_batch_size=4", "model.lora_rank=4",
            "checkpoint.resume=latest", f"output_dir={out}"]
    run([*accelerate_launch(2, free_ports(1)[0]), *args, "optim.max_steps=3"], cwd=REPO)
    assert metrics(out)[-1]["data/skipped_samples"] == sum(truth3)
    resumed = run([*accelerate_launch(2, free_ports(1)[0]), *args, "optim.max_steps=6"], cwd=REPO)
    assert "at step 3" in resumed.stdout
    last = metrics(out)[-1]
    assert last["step"] == 6 and last["data/skipped_samples"] == sum(truth6), (last, truth3, truth6)
    state = json.loads((out / "checkpoint-00000006" / "trainer_state.json").read_text())
    assert state["skipped_samples"] == sum(truth6)


@pytest.mark.slow
def test_training_on_an_all_bad_stream_stops_in_one_line(tmp_path):
    """`data.prompt_embeds=true` on shards written without embeddings, with the default bound."""
    import subprocess
    import sys

    from .train_helpers import REPO, TINY_ARGS, make_shards, train_env, write_photo_crops

    shards = make_shards(write_photo_crops(tmp_path / "images", per_photo=1), tmp_path / "shards", per_shard=1)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "sana_sr.train", *TINY_ARGS, f"data.shards={shards}",
                             "data.prompt_embeds=true", f"output_dir={tmp_path / 'run'}", "optim.max_steps=5"],
                            capture_output=True, text=True, timeout=300, env=train_env(), cwd=REPO)
    assert time.monotonic() - start < 120
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "1000 samples in a row were unusable" in errors[0] and "no prompt embedding" in errors[0]
    assert str(shards / "shard-0000") in errors[0]


def test_a_lost_rank_ends_training_with_one_line_and_exit_code_3(monkeypatch, capsys):
    """What `sana_sr.train` does with the error rank 0's collective raises in the test above; any other
    RuntimeError still surfaces as itself."""
    import sana_sr.train.trainer as trainer_module
    from sana_sr.train.__main__ import main

    def failing_trainer(message):
        class FailingTrainer:
            def __init__(self, config):
                pass

            def train(self):
                raise RuntimeError(message)

        return FailingTrainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    gloo = "[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 4000ms for recv operation"
    monkeypatch.setattr(trainer_module, "Trainer", failing_trainer(gloo))
    assert main(["dist.timeout_s=4"]) == 3
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [f"error: rank 0: a collective gave up after dist.timeout_s=4 s or lost a rank ({gloo})"]
    monkeypatch.setattr(trainer_module, "Trainer", failing_trainer("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["dist.timeout_s=4"])
