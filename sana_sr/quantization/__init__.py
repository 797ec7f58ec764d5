"""Low-bit quantization of SANA-SR: the SANA side of `compress` (matmul sites, the folded timestep, what is
quantized), the compressed components (diffusers models that load their own packed exports) and pipeline folder,
the fine-tunes on the training loop, and `sana-sr compress`."""
