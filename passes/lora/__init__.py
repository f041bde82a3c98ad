"""LoRA adapters: the Lora pass (`lora`), its branch module (`branch`) and MergeLora (`merge`)."""

from fxcook.passes.lora.lora import Lora, LoraConfig
from fxcook.passes.lora.merge import MergeLora, adapters

__all__ = ["Lora", "LoraConfig", "MergeLora", "adapters"]
