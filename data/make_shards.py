"""Image folder trees -> webdataset tar shards (the same as `sana-sr shards`; `--help` for the options)."""

import sys

from sana_sr.data.shards import main

if __name__ == "__main__":
    sys.exit(main())
