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

    import torch.distributed as dist

    from sana_sr.data.samples import DataStreamError
    from sana_sr.train.trainer import Trainer

    try:
        try:
            trainer = Trainer(config)
        except (ValueError, OSError) as e:  # bad data, missing weights: one line per run, not a traceback per rank
            import os

            if os.environ.get("RANK", "0") == "0":
                print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
            return 2
        try:
            return trainer.train()
        except DataStreamError as e:  # all-bad data, a stuck loader worker: one line per rank that met it
            import os

            world = int(os.environ.get("WORLD_SIZE", "1"))
            print(f"error: {'rank ' + os.environ['RANK'] + ': ' if world > 1 else ''}{e}", file=sys.stderr)
            return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
