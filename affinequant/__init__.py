"""affinequant: block-wise post-training quantization of LLMs (OmniQuant LWC/LET, AffineQuant)."""
from .models.adapters import get_adapter, supported_model_types
from .api import quantize, quantize_streamed
from .pipeline.calibrate import quantize_blocks
from .config import ConfigError, QuantConfig
from .formats.export import load_quantized, save_quantized

__all__ = ["QuantConfig", "ConfigError", "quantize", "quantize_streamed", "quantize_blocks", "get_adapter", "supported_model_types",
           "save_quantized", "load_quantized"]
