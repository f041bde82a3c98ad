"""ONNX / ONNX Runtime backend: export a CookedModel as an integer ONNX model (`export`), run it
(`session`, `OrtModel`), the op translations (`translations`) and checks on exported files (`checks`)."""

from fxcook.runtime.lowering import QuantLinearExport, lowered
from fxcook.runtime.onnx.export import MAX_IR_VERSION, export
from fxcook.runtime.onnx.session import INTEGER_GEMMS, OrtModel, integer_gemms, optimized_ops, session

__all__ = [
    "INTEGER_GEMMS",
    "MAX_IR_VERSION",
    "OrtModel",
    "QuantLinearExport",
    "export",
    "integer_gemms",
    "lowered",
    "optimized_ops",
    "session",
]
