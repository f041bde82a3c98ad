"""MoEfication: the Relufy pass (`relufy`), the Moefy pass (`moefy`), neuron partitioning (`partition`),
routers (`router`), the routed expert FFN (`routed`) and the `fxcook::moe_ffn` op its export form calls (`ops`)."""

from fxcook.passes.moefy.moefy import Moefy
from fxcook.passes.moefy.relufy import Relufy

__all__ = ["Moefy", "Relufy"]
