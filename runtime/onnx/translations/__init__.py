"""ONNX translations of fxcook's `torch.library` ops (defined by each technique: `passes/*/ops.py`) and of
aten ops the stock exporter lowers poorly, one module per technique.

Each module adds an onnxscript translation per op to `ONNX_TRANSLATIONS`, which the ONNX exporter passes
to `torch.onnx.export(custom_translation_table=...)`.
"""

from __future__ import annotations

import functools

import onnx
from onnxscript.values import Op, Opset

from fxcook.errors import NotSupportedYet

ONNX_TRANSLATIONS: dict = {}


@functools.lru_cache(maxsize=1)
def _ort_contrib_schemas() -> dict:
    """ONNX Runtime's com.microsoft schemas by name, newest version (one scan of its registry)."""
    from onnxruntime.capi import _pybind_state as ort_c

    out: dict = {}
    for s in ort_c.get_all_operator_schema():
        if s.domain == "com.microsoft" and (s.name not in out or s.since_version > out[s.name].since_version):
            out[s.name] = s
    return out


def ort_schema(name: str) -> onnx.defs.OpSchema:
    """The installed onnxruntime's own schema of a com.microsoft op, as an onnx OpSchema.

    The onnx package carries no schemas for ORT contrib ops; copying ORT's keeps the emitted node
    exactly what the installed runtime accepts.
    """
    src = _ort_contrib_schemas().get(name)
    if src is None:
        raise NotSupportedYet(f"the installed onnxruntime has no com.microsoft.{name} op")
    P = onnx.defs.OpSchema.FormalParameter
    opt = {
        o.name: getattr(onnx.defs.OpSchema.FormalParameterOption, o.name)
        for o in type(src.inputs[0].option).__members__.values()
    }
    params = lambda ps: [P(p.name, p.typeStr, param_option=opt[p.option.name]) for p in ps]
    return onnx.defs.OpSchema(
        name,
        "com.microsoft",
        src.since_version,
        inputs=params(src.inputs),
        outputs=params(src.outputs),
        type_constraints=[(t.type_param_str, list(t.allowed_type_strs), "") for t in src.type_constraints],
        attributes=[
            onnx.defs.OpSchema.Attribute(a.name, getattr(onnx.defs.OpSchema.AttrType, a.type.name), required=False)
            for a in src.attributes.values()
        ],
    )


def ort_op(name: str) -> Op:
    """An onnxscript op for ONNX Runtime's contrib op `com.microsoft.<name>` with its real schema."""
    return Op(Opset("com.microsoft", 1), name, ort_schema(name))


def load_all() -> dict:
    """Import every translation module (registering its ops and translations); returns the table."""
    from . import attention, moe, quant  # noqa: F401  (imported for their registrations)

    return ONNX_TRANSLATIONS
