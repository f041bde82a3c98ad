"""Backends that lower a CookedModel to code that really runs compressed: one backend per module
(`onnx`: ONNX / ONNX Runtime; `tensorrt`: TensorRT engines; `torch_cuda`: PyTorch CUDA kernels).
Import the backend you need; GPU-only dependencies are imported lazily inside them."""
