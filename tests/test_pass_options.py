"""Pass options are keyword-only: a positional option is an error naming the pass, never read as
calibration data."""

import pytest

from fxcook.errors import FxcookError
from fxcook.passbase import PassOptionError
from fxcook.passes import Moefy, Quantize, Relufy, Sparsify, Tap
from fxcook.testing import tiny_inputs


@pytest.mark.parametrize(
    ("cls", "arg", "hint"),
    [
        (Sparsify, "3:4", "pattern='3:4'"),
        (Quantize, "int4/channel", "weights='int4/channel'"),
        (Moefy, 8, "experts=8"),
        (Relufy, "ffn", "select='ffn'"),
    ],
)
def test_positional_options_are_refused_by_name(cls, arg, hint):
    with pytest.raises(PassOptionError, match=rf"{cls.__name__}: pass options are keyword-only") as err:
        cls(arg)
    assert isinstance(err.value, TypeError) and isinstance(err.value, FxcookError)
    assert hint in str(err.value)


def test_keywords_and_calibration_still_work():
    batches = [tiny_inputs("bert")]
    assert Sparsify(method="wanda", calibration=batches).calibration is batches
    assert Quantize(weights="int4/group16", acts=None).config.weights == "int4/group16"
    assert Moefy(experts=8, top_k=2).config.experts == 8
    assert Tap("[post]encoder.layer.0").config.taps == ["[post]encoder.layer.0"]  # tap specs are the subject
