"""`python -m sana_sr.train CONFIG [key.sub=value ...]`: the one training entry point.

Runs unchanged under plain python, torchrun, `accelerate launch` and Slurm (slurm/train_sana_sr.sh): the process
group comes from the launcher's environment, the strategy (DDP or DeepSpeed) from the config.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nOverrides use the config's keys, e.g. optim.lr=1e-4 data.crop=256 "
              "(see sana_sr/train/config.py for every field and its meaning).")
        return 0
    path = args.pop(0) if args and "=" not in args[0] else None

    from sana_sr.train.config import ConfigError, load_config

    try:
        config = load_config(path, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import os

    from sana_sr.data.samples import DataStreamError
    from sana_sr.distributed import collective_failed, process_group_released
    from sana_sr.train.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = f"rank {os.environ.get('RANK', '0')}: " if world > 1 else ""
    with process_group_released():
        try:
            trainer = Trainer(config)
        except (ValueError, OSError) as e:  # bad data, missing weights: one line per run, not a traceback per rank
            if os.environ.get("RANK", "0") == "0":
                print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
            return 2
        try:
            return trainer.train()
        except DataStreamError as e:  # all-bad data, a stuck loader worker: one line per rank that met it
            print(f"error: {rank}{e}", file=sys.stderr)
            return 1
        except RuntimeError as e:
            if not collective_failed(e):
                raise
            # Another rank is stuck or dead; the last complete checkpoint is where a resubmitted job resumes.
            print(f"error: {rank}a collective gave up after dist.timeout_s={config.dist.timeout_s:g} s "
                  f"or lost a rank ({str(e).splitlines()[0]})", file=sys.stderr)
            return 3


if __name__ == "__main__":
    from sana_sr.distributed import exit_code

    sys.exit(exit_code(main()))
