import sys

from sana_sr.cli import main

sys.exit(main())
