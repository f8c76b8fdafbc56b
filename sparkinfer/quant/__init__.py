"""ggml block formats: the one place that knows how weights are packed.

`quant_format(type)` gives a QuantFormat with numpy `dequantize`/`quantize`; byte layouts
for kernels are in `sparkinfer.quant.layouts`.
"""

from .formats import SUPPORTED_TYPES, QuantFormat, dequantize, quant_format, quantize

__all__ = ["SUPPORTED_TYPES", "QuantFormat", "dequantize", "quant_format", "quantize"]
