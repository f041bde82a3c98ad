"""Layer dropping: remove whole transformer blocks, at once or one every K training steps."""

from fxcook.passes.droplayers.droplayers import DropLayers

__all__ = ["DropLayers"]
