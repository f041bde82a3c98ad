"""The command line refuses bad paths and arguments before any work, and exports saved models."""

import os
import subprocess
import sys

import pytest
import torch

import fxcook
from fxcook import passes as P
from fxcook.cli import main
from fxcook.data import shakespeare_lines
from fxcook.manifest import sha256_file
from fxcook.testing import save_tiny_pretrained, tiny_inputs, tiny_model

RECIPE = "passes:\n  - quantize: {}\ncalibration: {samples: 8, batch_size: 4, max_length: 32}\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pretrained(tmp_path_factory.mktemp("hf") / "m", shakespeare_lines(n=80, seed=3))


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    import fxcook.models

    def refuse(*a, **k):
        raise AssertionError("the command loaded a model before checking its output path")

    monkeypatch.setattr(fxcook.models, "load_model", refuse)


def _hashes(folder):
    return {p: sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_version_and_python_m(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fxcook {version('fxcook')}"
    proc = subprocess.run(
        [sys.executable, "-m", "fxcook", "--version"],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"fxcook {version('fxcook')}"


def test_every_option_has_help():
    from fxcook.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name, parser in commands.items():
        bare = [a.option_strings or a.dest for a in parser._actions if not a.help]
        assert not bare, f"fxcook {name}: options without help: {bare}"


@pytest.mark.parametrize("where", ["same", "inside"])
def test_compress_into_the_model_directory_is_refused_before_work(tmp_path, model_dir, where, capsys, no_work):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    before = _hashes(model_dir)
    out = model_dir if where == "same" else model_dir / "compressed"
    assert main(["compress", "--model", str(model_dir), "--recipe", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is inside the input model directory {model_dir}" in err
    assert _hashes(model_dir) == before and not (model_dir / "compressed").exists()


def test_out_paths_are_checked_before_work(tmp_path, model_dir, capsys, no_work):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    for cmd in (["compress", "--recipe", str(recipe)], ["train"]):
        assert main([*cmd, "--model", str(model_dir), "--out", str(taken)]) == 2
        assert f"--out {taken} is an existing file" in capsys.readouterr().err
        assert main([*cmd, "--model", str(model_dir), "--out", str(taken / "sub")]) == 2
        assert f"--out {taken / 'sub'}: {taken} is a file" in capsys.readouterr().err
        assert main([*cmd, "--model", str(model_dir), "--out", "/proc/fxcook-out/x"]) == 2
        assert "--out /proc/fxcook-out/x: cannot write into /proc" in capsys.readouterr().err
    assert taken.read_text() == "keep me"


@pytest.mark.parametrize(
    "flag,value", [("--batch-size", "0"), ("--steps", "0"), ("--steps", "-1"), ("--lines", "0"), ("--steps", "many")]
)
def test_train_bad_counts_are_usage_errors(tmp_path, flag, value, capsys, no_work):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "o"), flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: must be an integer >= " in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_api_bad_counts_name_the_argument():
    cooked = fxcook.compile(tiny_model("llama"), [], tiny_inputs("llama"))
    data = tiny_inputs("llama", batch=4)
    for kw, name in (({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"), ({"steps": -1}, "steps")):
        with pytest.raises(fxcook.FxcookError, match=f"train: {name} must be an integer >= 1"):
            fxcook.train(cooked, None, data, **kw, progress=False)


def test_degenerate_tokenizer_is_an_error_naming_the_model(tmp_path, capsys):
    bare = tmp_path / "bare"
    tiny_model("bert").save_pretrained(bare)  # no tokenizer files: transformers falls back to a 5-token vocab
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    assert main(["compress", "--model", str(bare), "--recipe", str(recipe), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"model {bare}: 100% of the text's tokens are the unknown token '[UNK]'" in err
    assert not (tmp_path / "o").exists()


# ---- export -------------------------------------------------------------------------------------------
def _saved(tmp_path, passes):
    """A model saved with fxcook.save, and the cooked model it was saved from."""
    batch = tiny_inputs("bert", batch=2, seq=8)
    cooked = fxcook.compile(tiny_model("bert"), passes(batch), batch)
    return fxcook.save(cooked, tmp_path / "saved"), cooked


def test_export_onnx_matches_the_model(tmp_path, capsys):
    from fxcook.runtime.onnx import OrtModel

    folder, cooked = _saved(tmp_path, lambda b: [P.Quantize(calibration=[b])])
    assert main(["export", str(folder), "--to", "onnx"]) == 0
    path = tmp_path / "saved.onnx"
    assert f"wrote {path}" in capsys.readouterr().out
    batch = tiny_inputs("bert", batch=3, seq=11, seed=4)  # another batch and sequence size than the capture's
    with torch.no_grad():
        ref = cooked(**batch).last_hidden_state
    got = OrtModel(path)(**batch)
    assert (got - ref).abs().max() < 1e-4


def test_export_argument_errors(tmp_path, capsys):
    folder, _ = _saved(tmp_path, lambda b: [])
    assert main(["export", str(tmp_path / "nowhere"), "--to", "onnx"]) == 2
    assert f"export: {tmp_path / 'nowhere'} is not a directory" in capsys.readouterr().err
    assert main(["export", str(folder), "--to", "onnx", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is an existing directory" in capsys.readouterr().err
    assert main(["export", str(folder), "--to", "tensorrt", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "another suffix than .onnx" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(folder), "--to", "tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_export_tensorrt_writes_the_checked_onnx_then_builds_or_says_why(tmp_path, capsys):
    from fxcook.runtime.tensorrt import check_explicit_quantization

    folder, _ = _saved(tmp_path, lambda b: [P.Quantize(acts="int8/tensor", calibration=[b])])
    engine = tmp_path / "m.engine"
    rc = main(["export", str(folder), "--to", "tensorrt", "--out", str(engine)])
    assert check_explicit_quantization(tmp_path / "m.onnx") == []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert rc == 2 and "needs the `tensorrt` package" in capsys.readouterr().err and not engine.exists()
    else:
        assert rc == 0 and engine.stat().st_size > 0
