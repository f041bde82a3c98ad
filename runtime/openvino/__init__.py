"""OpenVINO backend: lower a CookedModel to an OpenVINO model (`convert`, `export` to model.xml +
model.bin), compile it for the CPU plugin with its int8 kernels (`compile_model`, `OvModel`), and read
which precision each GEMM really runs in (`gemm_precisions`, `int8_gemms`)."""

from fxcook.runtime.openvino.compiled import (
    GEMM_LAYERS,
    PRECISIONS,
    OvModel,
    compile_model,
    gemm_precisions,
    has_bf16,
    int8_gemms,
    layer_profile,
)
from fxcook.runtime.openvino.convert import convert, export, require_openvino, save

__all__ = [
    "GEMM_LAYERS",
    "PRECISIONS",
    "OvModel",
    "compile_model",
    "convert",
    "export",
    "gemm_precisions",
    "has_bf16",
    "int8_gemms",
    "layer_profile",
    "require_openvino",
    "save",
]
