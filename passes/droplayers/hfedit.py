"""The `cooked.hf_edits` entry of a layer drop (the protocol is described in `fxcook.runtime.hf`)."""

from __future__ import annotations

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # how HF configs name a stack's depth
PER_LAYER_KEYS = ("layer_types",)  # config lists with one entry per layer


def hf_edit(cooked, touched: list[str]) -> dict:
    """The `cooked.hf_edits` entry for the stacks `touched`: the config's depth key (and per-layer lists)
    rewritten for the blocks left, which are renumbered 0..k-1 (they keep their original names here)."""
    origin = getattr(getattr(cooked, "origin", None), "config", None) or {}
    config, rename = {}, {}
    for stack in touched:
        kept = sorted(int(k) for k in cooked.get_submodule(stack)._modules)
        keys = (("num_decoder_layers",) if "decoder" in stack else ()) + LAYER_COUNT_KEYS
        key = next((k for k in keys if isinstance(origin.get(k), int)), None)
        if key is not None:
            config[key] = len(kept)
        for k in PER_LAYER_KEYS:
            if isinstance(origin.get(k), list) and len(origin[k]) > kept[-1]:
                config[k] = [origin[k][i] for i in kept]
        rename.update({f"{stack}.{old}": f"{stack}.{new}" for new, old in enumerate(kept) if old != new})
    return {"config": config, "rename": rename}
