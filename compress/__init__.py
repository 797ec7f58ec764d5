"""Model-agnostic low-bit compression: SPR²Q and CompSRT quantization, min-max and 2DQuant-style baselines, and a
real packed export (n-bit integers in safetensors, not fake quantization on disk); `compress.pruning`: structured
pruning on torch-pruning's dependency graph of any model that describes its blocks as a `PrunableStructure`.

Takes any torch.nn.Module and a list of calibration batches; imports nothing from sana_sr.

    from compress import QuantizeConfig, quantize, export_quantized, load_quantized
    result = quantize(model, batches, QuantizeConfig(method="compsrt", wbits=4, abits=4))
    export_quantized(result.model, "out/")            # weights.safetensors + layout.json
    model = load_quantized(build_fp_skeleton(), "out/")
"""

from .export import export_quantized, export_size, fp16_reference_bytes, load_quantized, nominal_bits, read_layout
from .features import FeatureTap, first_tensor
from .finetune import distill
from .hadamard import fwht, hadamard_matrix, next_pow2, rotate, unrotate
from .layers import LayerSpec, MatMul, QuantMatmul, QuantWeightLayer, quant_modules, set_mode
from .methods import METHODS, QuantizationResult, QuantizeConfig, default_forward, quantize
from .pack import pack_bits, unpack_bits
from .quantizer import UniformQuantizer, fake_quant
from .select import Decision, SelectionRule, plan, summarize

__all__ = [
    "METHODS", "Decision", "FeatureTap", "LayerSpec", "MatMul", "QuantMatmul", "QuantWeightLayer", "QuantizationResult",
    "QuantizeConfig", "SelectionRule", "UniformQuantizer", "default_forward", "distill", "export_quantized",
    "export_size", "fake_quant", "first_tensor", "fp16_reference_bytes", "fwht", "hadamard_matrix", "load_quantized", "next_pow2",
    "nominal_bits", "pack_bits", "plan", "quant_modules", "quantize", "read_layout", "rotate", "set_mode",
    "summarize", "unpack_bits", "unrotate",
]
