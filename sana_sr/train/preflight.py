"""`python -m sana_sr.train.preflight --world N CONFIG [key=value ...]`: the checks a job script runs before it starts
N trainers (each loading a model for minutes): the config resolves, and the shards give every reader one of its own.

Prints nothing and exits 0 when the run can start; otherwise one line on stderr (the numbers and the fix), exit 2.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sana_sr.train.preflight", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, required=True, help="training processes over all nodes")
    parser.add_argument("args", nargs="*", help="CONFIG [key=value ...], as given to python -m sana_sr.train")
    options = parser.parse_args(argv)
    args = list(options.args)
    path = args.pop(0) if args and "=" not in args[0] else None

    from sana_sr.data.streaming import check_readers, resolve_shards
    from sana_sr.train.config import ConfigError, load_config

    try:
        config = load_config(path, args)
        config.optim.accumulation(options.world)  # global batch = micro x accumulation x world
        if not config.data.shards:
            raise ValueError("data.shards is empty: pass data.shards=FOLDER (written by `sana-sr shards`)")
        urls, sizes = resolve_shards(config.data.shards)
        check_readers(config.data.shards, len(urls), options.world, config.data.workers, sizes)
    except (ConfigError, ValueError, OSError) as e:
        print(f"sana-sr: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
