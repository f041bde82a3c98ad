"""The command line: inspect lists MiniLM's sites; compress writes a model; errors exit cleanly."""

import torch

from fxcook.cli import main


def test_inspect_minilm(capsys):
    assert main(["inspect", "minilm"]) == 0
    out = capsys.readouterr().out
    assert "linear layers: 37 (36 in 6 blocks)" in out
    assert "pooler.dense" in out
    assert "block weights 10,616,832" in out
    assert "FFN blocks: 6" in out


def test_compress_writes_model_and_report(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - quantize: {}\ncalibration: {samples: 8, batch_size: 4, max_length: 32}\n")
    out = tmp_path / "out"
    assert main(["compress", "--model", "minilm", "--recipe", str(recipe), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "report.txt", "r.yaml"}
    assert "Quantize" in (out / "report.txt").read_text()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        codes = f.get_tensor("encoder.layer.0.intermediate.dense.qweight")
    assert codes.dtype == torch.int8 and codes.shape == (1536, 384)


def test_errors_exit_2_with_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes:\n  - quantize: {bits: 3, nonsense: 1}\n")
    assert main(["compress", "--model", "minilm", "--recipe", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "passes[0].quantize.nonsense" in capsys.readouterr().err
    assert main(["inspect", "no/such/model"]) == 2
    assert "no/such/model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
