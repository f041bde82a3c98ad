"""The Python front: lazy submodules, compile's argument checks, capture errors at the user's line."""

import inspect
import subprocess
import sys

import pytest
import torch
from torch import nn

import fxcook
from fxcook.errors import CaptureError, FxcookError, PassError
from fxcook.testing import tiny_inputs, tiny_model


def test_bare_import_gives_submodules_lazily():
    code = (
        "import sys, fxcook\n"
        "assert 'fxcook.passes' not in sys.modules and 'fxcook.runtime' not in sys.modules\n"
        "assert 'fxcook.runtime.onnx' not in sys.modules\n"
        "print(fxcook.passes.Quantize.__name__, fxcook.runtime.onnx.export.__name__,\n"
        "      fxcook.runtime.tensorrt.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Quantize", "export", "fxcook.runtime.tensorrt"]
    with pytest.raises(AttributeError, match="no attribute 'passez'"):
        fxcook.passez  # noqa: B018


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert"), tiny_inputs("bert")


def test_a_single_pass_is_refused_naming_it(bert):
    model, x = bert
    with pytest.raises(PassError, match=r"got the single pass Relufy\(\); pass \[Relufy\(\)\]"):
        fxcook.compile(model, fxcook.passes.Relufy(), example_inputs=x)
    with pytest.raises(PassError, match="passes must be a list of fxcook passes, got str"):
        fxcook.compile(model, "relufy", example_inputs=x)


def test_a_generator_of_passes_runs_every_pass(bert):
    model, x = bert
    cooked = fxcook.compile(model, (p for p in [fxcook.passes.Relufy()]), example_inputs=x)
    assert [r.name for r in cooked.history] == ["relufy"]


@pytest.mark.parametrize("single", ["dict", "tensor"])
def test_a_single_batch_as_calibration_is_refused_before_capture(bert, monkeypatch, single):
    model, x = bert
    batch = x if single == "dict" else x["input_ids"]
    monkeypatch.setattr(fxcook.pipeline, "capture", lambda *a, **k: pytest.fail("captured before checking"))
    with pytest.raises(
        FxcookError,
        match=r"pass 'sparsify' \(pipeline item 0\): calibration is \w+, a single batch; "
        r"pass a list of batches .* e\.g\. calibration=\[batch\]",
    ):
        fxcook.compile(model, [fxcook.passes.Sparsify(method="wanda", calibration=batch)], example_inputs=x)


def test_calibration_batches_is_the_checked_reader():
    from fxcook.tracing import calibration_batches

    assert list(calibration_batches(iter([1, 2, 3]), "p", 2)) == [1, 2]
    with pytest.raises(FxcookError, match="p: calibration is int, not an iterable of batches"):
        calibration_batches(3, "p")


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x.reshape(-1, 8))  # the line capture must point at


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        return self.inner(x) + 1


def test_capture_error_points_at_the_users_line():
    line = inspect.getsourcelines(Inner.forward)[1] + 1
    with pytest.raises(CaptureError) as err:
        fxcook.capture(Outer(), torch.randn(2, 4))
    msg = str(err.value)
    assert f"inner.lin (Linear) at {__file__}:{line} in Inner.forward (`return self.lin(x.reshape(-1, 8))" in msg
    assert "module.py" not in msg and "linear.py" not in msg
