"""`sbatch slurm/train_sana_sr.sh` on a real two-node Slurm cluster started on this machine (loopback only)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from .slurm_cluster import SlurmCluster, available, free_ports
from .train_helpers import REPO, TINY_ARGS, make_shards, metrics, train_env, write_photo_crops

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(available() is not None, reason=f"no test Slurm cluster: {available()}")]

SCRIPT = REPO / "slurm" / "train_sana_sr.sh"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2)
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-data")
    return make_shards(write_photo_crops(root / "images"), root / "shards")


def _submit(cluster: SlurmCluster, workdir, overrides: list[str]) -> int:
    env = train_env(SANA_SR_PYTHON=sys.executable, SANA_SR_PROCS_PER_NODE="1", MASTER_PORT=str(free_ports(1)[0]))
    return cluster.sbatch(
        ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20", "--open-mode=append",
         f"--output={workdir}/job-%j.out", str(SCRIPT), str(REPO / "sana_sr" / "configs" / "tiny.yaml"),
         "dist.cpu=true", *overrides],
        env=env, cwd=workdir,
    )


def test_two_nodes_train_one_synchronised_model(cluster, shards, tmp_path):
    run_dir = tmp_path / "run"
    job = _submit(cluster, tmp_path, [*TINY_ARGS, f"data.shards={shards}", f"output_dir={run_dir}",
                                      "optim.global_batch_size=4", "optim.max_steps=4", "checkpoint.every_steps=2"])
    info = cluster.wait(job, timeout=600)
    output = (tmp_path / f"job-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", output[-4000:] + cluster.log_tail()

    replicas = json.loads((run_dir / "replicas.json").read_text())
    ranks = replicas["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]  # identical LoRA weights ...
    assert ranks[0]["data_digest"] != ranks[1]["data_digest"]  # ... after steps on different data
    assert ranks[0]["samples"] == ranks[1]["samples"] == 8
    assert "world 2 (DistributedType.MULTI_CPU)" in output and "rendezvous 127.0.0.1:" in output

    # Exactly one set of logs and checkpoints: rank 0 wrote them, once.
    assert output.count("step 4:") == 1
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4]
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-00000002", "checkpoint-00000004"]
    assert not list(run_dir.glob(".checkpoint-*"))
    assert (run_dir / "final" / "pipeline" / "model_index.json").is_file()


def test_too_few_shards_for_ranks_times_workers_stop_the_job_at_start(cluster, shards, tmp_path):
    """8 shards for 2 ranks x 8 loader workers: the script's preflight says so in one line before any trainer starts
    (the documented 2-node x 8-GPU job with 8 workers meets this with LSDIR and the default shard size)."""
    job = _submit(cluster, tmp_path, [*TINY_ARGS, f"data.shards={shards}", f"output_dir={tmp_path / 'run'}",
                                      "optim.global_batch_size=4", "data.workers=8"])
    info = cluster.wait(job, timeout=300)
    output = (tmp_path / f"job-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("sana-sr: ")]
    assert errors == [f"sana-sr: 8 shards in {shards} are too few for 2 ranks x 8 workers = 16 readers: re-write "
                      "them with `sana-sr shards --max-count 1` (at least 16 shards), or set data.workers=4 or fewer"]
    assert "world 2" not in output and not (tmp_path / "run").exists()


def test_srun_gets_the_cpu_allocation_and_each_node_its_own_cpu(cluster, tmp_path):
    """What the script passes to srun, seen from inside the step: the task's CPU count and, where the cluster binds
    CPUs (task/affinity here), a CPU of its own per node."""
    script = tmp_path / "probe.sh"
    text = SCRIPT.read_text()
    # The script up to its srun line, with the trainer replaced by a probe of the step's CPU allocation.
    head = text[: text.index('srun --ntasks-per-node=1 "${CPUS[@]}"')]
    head = head.replace('"$PYTHON" -m sana_sr.train.preflight', ": preflight skipped")
    script.write_text(head + 'srun --ntasks-per-node=1 "${CPUS[@]}" bash -c \'echo "cpus $SLURM_NODEID '
                      '$SLURM_CPUS_PER_TASK $(grep Cpus_allowed_list /proc/self/status | cut -f2)"\'\n')
    job = cluster.sbatch(["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=5",
                          f"--output={tmp_path}/job-%j.out", str(script), "unused.yaml"], env={}, cwd=tmp_path)
    info = cluster.wait(job, timeout=120)
    output = (tmp_path / f"job-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", output
    lines = sorted(line.split()[1:] for line in output.splitlines() if line.startswith("cpus "))
    assert [line[:2] for line in lines] == [["0", "1"], ["1", "1"]], output
    if cluster.binds_cpus:
        assert [line[2] for line in lines] == ["0", "1"], output


def test_time_limit_signal_checkpoints_requeues_and_resumes(cluster, shards, tmp_path):
    run_dir = tmp_path / "run"
    job = _submit(cluster, tmp_path, [*TINY_ARGS, f"data.shards={shards}", f"output_dir={run_dir}",
                                      "optim.global_batch_size=4", "optim.max_steps=30"])
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").is_file() or len(metrics(run_dir)) < 3:
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(1)
    # What Slurm does before the time limit (--signal=B:USR1@300): USR1 to the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True, env=cluster.env)
    info = cluster.wait(job, timeout=600)
    output = (tmp_path / f"job-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", output[-4000:]
    assert info["Restarts"] == "1"
    assert "requeueing job" in output and "resumed from" in output
    steps = [m["step"] for m in metrics(run_dir)]
    assert steps[-1] == 30 and sorted(set(steps)) == list(range(1, 31))
