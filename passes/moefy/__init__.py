"""MoEfication: the Relufy pass (`relufy`), the Moefy pass (`moefy`), the routed expert FFN with its
partitioning and router (`routed`) and the `fxcook::moe_ffn` op its export form calls (`ops`)."""

from fxcook.passes.moefy.moefy import Moefy
from fxcook.passes.moefy.relufy import Relufy

__all__ = ["Moefy", "Relufy"]
