"""Quantization: the Quantize pass (`quantize`), its fake quantizers, calibration and SmoothQuant
(`quantizers`), int8 embedding tables (`embeddings`), HF MoE expert GEMMs (`experts`) and the
`fxcook::` integer ops the export forms call (`ops`)."""

from fxcook.passes.quantize.quantize import Quantize, QuantizeConfig

__all__ = ["Quantize", "QuantizeConfig"]
