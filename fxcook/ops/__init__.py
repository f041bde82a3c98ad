"""fxcook's own `torch.library` ops (namespace `fxcook`) and their ONNX translations.

Each module here defines custom ops with fake kernels, so graphs containing them re-export, and adds
an onnxscript translation per op to `ONNX_TRANSLATIONS`, which the ONNX exporter passes to
`torch.onnx.export(custom_translation_table=...)`.
"""
from __future__ import annotations

import importlib
import pkgutil

ONNX_TRANSLATIONS: dict = {}


def load_all() -> dict:
    """Import every op module (registering its ops and translations); returns the table."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return ONNX_TRANSLATIONS
