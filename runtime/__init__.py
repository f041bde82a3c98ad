"""Backends that lower a CookedModel to code that really runs compressed: one backend per module
(`onnx`: ONNX / ONNX Runtime; `openvino`: OpenVINO IR on its CPU plugin; `tensorrt`: TensorRT engines; `torch_cuda`: PyTorch CUDA kernels).
Each backend is imported on first use (`fxcook.runtime.onnx` after a bare `import fxcook`); GPU-only
dependencies are imported lazily inside them."""

import importlib

BACKENDS = ("onnx", "openvino", "tensorrt", "torch_cuda")


def __getattr__(name):
    if name in BACKENDS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
