"""Real-ISR evaluation of a SANA-SR model on RealSR / DRealSR / DIV2K-Val / LR-only folders: the entry users call,
the same as `sana-sr evaluate` (options and outputs: sana_sr/evaluation/evaluate.py, docs/evaluation.md).

    accelerate launch --multi_gpu --num_processes 8 eval/realsr.py --model PIPELINE --root RealSR -o runs/eval/realsr
"""

import sys

from sana_sr.distributed import exit_code
from sana_sr.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(exit_code(main()))
