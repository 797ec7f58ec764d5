"""A real Slurm cluster on this machine for the tests: munged, slurmctld and N slurmd (`slurmd -N nodeK`).

Everything listens on the loopback (127.0.0.1): the controller, every node (NodeAddr), the munge socket (a file
in the cluster's own folder). No test traffic leaves the machine. Needs Debian's slurm-wlm and munge and root
(SlurmUser=root). proctrack/linuxproc avoids cgroups.

CPU binding: task/affinity (sched_setaffinity only), with each node's CPUs but one declared specialised
(`CpuSpecList`), so that node K's tasks are bound to CPU K: all nodes share one host, and without that every node
would bind its first task to CPU 0. Tried here (Debian slurm-wlm 22.05 in a container, cgroup v1 mounted rw):
task/affinity binds as intended; task/cgroup (cgroup/v1, ConstrainCores, proctrack/cgroup) also confines tasks, but
it creates slurm_nodeK hierarchies in the host's /sys/fs/cgroup that outlive the cluster, so the tests do not use
it. With fewer host CPUs than nodes the cluster falls back to task/none.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


def available() -> str | None:
    """None when a cluster can be started here, else why not."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge; .ci/run does)"
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root"
    return None


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class SlurmCluster:
    def __init__(self, root: Path, nodes: int = 2, cpus: int = 2):
        self.root, self.nodes, self.cpus = root, nodes, cpus
        # Binding node K to CPU K needs that CPU on this host, and a CPU per node in each node's declaration.
        self.binds_cpus = len(os.sched_getaffinity(0)) >= nodes and cpus >= nodes
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_config(self) -> None:
        host = socket.gethostname()
        ctld_port, *node_ports = free_ports(1 + self.nodes)
        munge = self.root / "munge"
        lines = [
            "ClusterName=sanasrtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge",
            f"AuthInfo=socket={munge / 'munge.sock'}",
            "CredType=cred/munge",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool-%n'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            f"TaskPlugin={'task/affinity' if self.binds_cpus else 'task/none'}",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MinJobAge=3600",
            "KillWait=60",
        ]
        names = [f"node{i + 1}" for i in range(self.nodes)]
        for i, (name, port) in enumerate(zip(names, node_ports)):
            spec = ""
            if self.binds_cpus:  # node i keeps CPU i for jobs; the others are "specialised" (daemons only)
                spec = "CpuSpecList=" + ",".join(str(c) for c in range(self.cpus) if c != i) + " "
            lines.append(f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} CPUs={self.cpus} "
                         f"{spec}State=UNKNOWN")
        lines.append(f"PartitionName=test Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP "
                     "OverSubscribe=YES")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        munge = self.root / "munge"
        (self.root / "state").mkdir(parents=True)
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._write_config()
        subprocess.run(
            ["munged", "--force", f"--key-file={key}", f"--socket={munge / 'munge.sock'}",
             f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'seed'}"],
            check=True,
        )
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        for i in range(self.nodes):
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", f"node{i + 1}"], check=True, env=self.env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T %D"], capture_output=True, text=True, env=self.env).stdout
            if out.split() == ["idle", str(self.nodes)]:
                return
            time.sleep(0.5)
        raise RuntimeError(f"cluster did not come up: sinfo says {out!r}\n{self.log_tail()}")

    def stop(self) -> None:
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True)
        time.sleep(1)
        for pid_file in self.root.glob("*.pid"):
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        subprocess.run(["munged", "-s", f"--socket={self.root / 'munge' / 'munge.sock'}"], capture_output=True)

    def log_tail(self, lines: int = 40) -> str:
        logs = sorted(self.root.glob("*.log"))
        return "\n".join(f"== {p.name}\n" + "\n".join(p.read_text().splitlines()[-lines:]) for p in logs)

    def sbatch(self, args: list[str], env: dict[str, str], cwd: Path) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, check=True,
                             env=dict(self.env, **env), cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                             env=self.env).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s")
