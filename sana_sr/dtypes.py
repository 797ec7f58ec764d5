"""The precisions the commands and configs accept, by name (`--dtype fp32|bf16|fp16`)."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
