"""The loader's worker processes: they outlive no trainer and survive the signals meant for it.

Slurm signals every process of a job step, workers included; the trainer decides when the run ends (it saves a
checkpoint first), and its workers end with it.
"""

from __future__ import annotations

import atexit
import signal
from pathlib import Path


def ignore_termination(worker_id: int) -> None:
    """The loader's worker_init_fn. A worker that died of SIGTERM would make the trainer raise before it can
    checkpoint, so it ignores SIGTERM; and the kernel kills it when its trainer dies (else one stuck in a shard,
    where torch's watchdog never runs, would outlive it for ever). Workers start with SIGTERM blocked
    (StreamingLoader.__iter__), so one arriving before this runs is ignored too."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


@atexit.register
def _kill_loader_workers() -> None:
    """Loader workers ignore SIGTERM, so multiprocessing's exit handler, which terminates and then joins them, would
    wait for ever on one stuck in a shard (a timed-out `pipe:` read): kill them first (atexit runs the last registered
    first). At exit they have nothing left to do."""
    import multiprocessing

    for process in multiprocessing.active_children():
        try:
            name = Path(f"/proc/{process.pid}/comm").read_text().strip()  # torch names its workers so
        except OSError:
            continue
        if process.daemon and name == "pt_data_worker":
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would call the kill a worker failure
            process.kill()
