"""The ``orthotune`` command line: help and version, one-line errors that leave nothing behind, and a tiny
end-to-end ``finetune`` on a BERT built from a config (no download, a few seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from references import cli_commands, run_cli
from safetensors import safe_open

import orthotune
from orthotune import cli

transformers = pytest.importorskip("transformers")

WORDS = ["good", "great", "happy", "love", "fine", "bad", "awful", "sad", "hate", "poor", "very", "not", "day", "movie"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (width 32) and its WordPiece tokenizer, saved as a transformers model directory."""
    import torch

    directory = tmp_path_factory.mktemp("tiny-bert")
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    config = transformers.BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _rows() -> list[tuple[str, str, float]]:
    positive, negative = WORDS[:5], WORDS[5:10]
    rows = []
    for modifier in ("", "very ", "not not ", "day ", "movie "):
        rows += [(modifier + word, "pos", 1.5 + len(word) / 10) for word in positive]
        rows += [(modifier + word, "neg", -1.5 - len(word) / 10) for word in negative]
    return rows


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.csv"
    path.write_text("sentence,sentiment,score\n" + "".join(f"{t},{c},{s}\n" for t, c, s in _rows()), encoding="utf-8")
    return path


@pytest.fixture
def jsonl_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t, "rating": s}) + "\n" for t, _, s in _rows()), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ help, version
def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "--version")
    assert status == 0
    assert out.strip() == f"orthotune {orthotune.__version__}"


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert "finetune" in cli_commands()
    status, out, _ = run_cli(capsys, "--help")
    assert status == 0 and "usage: orthotune" in out
    for command in cli_commands():
        status, out, _ = run_cli(capsys, command, "--help")
        assert status == 0, command
        assert f"usage: orthotune {command}" in out
        assert "(default: None)" not in out and "(default: False)" not in out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys)
    assert status != 0 and "finetune" in out


def test_import_stays_light() -> None:
    """Importing orthotune and its CLI, and ``orthotune --version``, do not import transformers."""
    code = (
        "import sys, orthotune.cli\n"
        "try:\n    orthotune.cli.main(['--version'])\nexcept SystemExit as exit_:\n    assert exit_.code == 0\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"orthotune {orthotune.__version__}"


# ------------------------------------------------------------------------------------------- bad input
def assert_one_line_error(status: int, err: str, *fragments: str) -> None:
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("orthotune finetune: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--data", "{tmp}/missing.csv"], ["missing.csv does not exist", "CSV or JSON Lines"]),
        (["--data", "{csv}", "--text-column", "review"], ["no column 'review'", "--text-column", "'sentence'"]),
        (["--data", "{csv}", "--text-column", "sentence", "--label-column", "stars"], ["no column 'stars'"]),
        (
            ["--data", "{csv}", "--text-column", "sentence", "--label-column", "sentiment", "--task", "regression"],
            ["'pos'", "not a finite number", "--task classification"],
        ),
        (
            ["--data", "{csv}", "--text-column", "sentence", "--label-column", "score", "--task", "classification"],
            ["a fraction, not a class", "--task regression"],
        ),
        (["--model", "{tmp}/no-such-model"], ["no-such-model does not exist", "local transformers model directory"]),
        (["--model", "{tmp}"], ["no config.json"]),
        (["--model", "{broken}"], ["cannot be loaded", "save_pretrained"]),
        (["--block-size", "5"], ["--block-size 5 does not fit", "32 input features", "2, 4, 8, 16, 32"]),
        (["--method", "boft", "--block-size", "16", "--butterfly-factors", "3"], ["--block-size 16 does not fit"]),
        (["--num-blocks", "3"], ["--num-blocks 3 does not fit", "1, 2, 4"]),
        (["--target-modules", "q_proj,v_proj"], ["matches no layer", "query"]),
        (["--method", "boft", "--coft"], ["--coft", "--method oft only"]),
        (["--neumann-terms", "2"], ["--neumann-terms 2 is too few"]),
        (["--epochs", "-1"], ["--epochs", "-1"]),
        (["--method", "lora"], ["--method", "lora"]),
        (["--method", "hra", "--block-size", "8"], ["--block-size describe the rotation blocks", "--reflections"]),
        (["--method", "hra", "--reflections", "5"], ["--reflections 5 is odd", "use 6"]),
        (["--method", "hra", "--neumann-terms", "5"], ["--neumann-terms", "--method oft only"]),
        (["--reflections", "4"], ["--reflections applies to --method hra only"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny_model: Path,
    csv_file: Path,
    argv: list[str],
    fragments: list[str],
) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}', encoding="utf-8")
    defaults = {
        "--model": str(tiny_model),
        "--data": str(csv_file),
        "--text-column": "sentence",
        "--label-column": "sentiment",
    }
    argv = [arg.format(tmp=tmp_path, csv=csv_file, broken=broken) for arg in argv]
    for option, value in defaults.items():
        if option not in argv:
            argv += [option, value]
    output = tmp_path / "out" / "adapter"
    before = _leftovers(tmp_path)
    status, _, err = run_cli(capsys, "finetune", *argv, "--output", str(output), "--quiet")
    assert_one_line_error(status, err, *fragments)
    assert not output.parent.exists()
    assert _leftovers(tmp_path) == before


def test_data_options_need_a_data_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, _, err = run_cli(
        capsys, "finetune", "--task", "regression", "--text-column", "t", "--output", str(tmp_path / "o")
    )
    assert_one_line_error(status, err, "--text-column, --task describe a --data file")
    assert _leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    output = tmp_path / "adapter"
    output.mkdir()
    (output / "keep.txt").write_text("mine", encoding="utf-8")
    # Checked first: the missing data file is not even looked at.
    status, _, err = run_cli(capsys, "finetune", "--output", str(output), "--data", str(tmp_path / "missing.csv"))
    assert_one_line_error(status, err, "already exists", "--overwrite")
    assert _leftovers(output) == ["keep.txt"]
    assert _leftovers(tmp_path) == ["adapter"]


def test_bad_data_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cases = {
        "labels.txt": ("text,label\na,1\n", "unknown format '.txt'"),
        "empty.csv": ("text,label\n", "has no rows"),
        "list.jsonl": ('{"text": "a", "label": [1]}\n{"text": "b", "label": 2}\n', "label [1]"),
        "broken.jsonl": ('{"text": "a", "label": 1\n', "line 1 is not JSON"),
        "one-class.csv": ("text,label\na,x\nb,x\nc,x\nd,x\n", "at least two classes"),
        "unique.csv": ("text,label\na,w\nb,x\nc,y\nd,z\n", "too many classes"),
    }
    for name, (content, fragment) in cases.items():
        path = tmp_path / name
        path.write_text(content, encoding="utf-8")
        status, _, err = run_cli(capsys, "finetune", "--data", str(path), "--output", str(tmp_path / "out"))
        assert_one_line_error(status, err, fragment)
        assert not (tmp_path / "out").exists()


def test_failure_while_saving_leaves_nothing(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tiny_model: Path,
    csv_file: Path,
) -> None:
    def half_save(directory: Path, *args: object, **kwargs: object) -> None:
        (directory / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(cli.finetune, "_save", half_save)
    output = tmp_path / "new" / "adapter"
    status, _, err = run_cli(
        capsys,
        "finetune",
        "--model",
        str(tiny_model),
        "--data",
        str(csv_file),
        "--text-column",
        "sentence",
        "--label-column",
        "sentiment",
        "--epochs",
        "0.1",
        "--output",
        str(output),
        "--quiet",
    )
    assert_one_line_error(status, err, "disk full", "nothing was written")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------ end to end
def test_finetune_classification_end_to_end(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_model: Path, csv_file: Path
) -> None:
    output = tmp_path / "adapter"
    output.mkdir()
    (output / "stale.txt").write_text("old run", encoding="utf-8")
    status, out, err = run_cli(
        capsys,
        "finetune",
        "--model",
        str(tiny_model),
        "--data",
        str(csv_file),
        "--text-column",
        "sentence",
        "--label-column",
        "sentiment",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--block-size",
        "8",
        "--lr",
        "1e-2",
        "--output",
        str(output),
        "--overwrite",
        "--merge",
    )
    assert status == 0, err
    files = set(_leftovers(output))
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "head.safetensors",
        "head_config.json",
        "metrics.json",
        "merged",
    } <= files
    assert "stale.txt" not in files
    assert _leftovers(tmp_path) == ["adapter", "train.csv"]  # no staging directory left behind
    assert (output / "merged" / "config.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    for path in [output, *output.rglob("*")]:  # readable like any other new file, not private to the writer
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path

    config = json.loads((output / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == "OFT" and config["oft_block_size"] == 8
    with safe_open(output / "adapter_model.safetensors", "pt") as adapter:
        rotations = [key for key in adapter.keys() if ".oft_R." in key]
    assert len(rotations) == 2 * 6  # every linear layer of both transformer layers
    head = json.loads((output / "head_config.json").read_text(encoding="utf-8"))
    assert head["task"] == "classification" and head["classes"] == ["neg", "pos"]

    metrics = json.loads((output / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["metric"] == "accuracy"
    assert (metrics["train_examples"], metrics["test_examples"]) == (40, 10)
    for stage in ("before", "after"):
        accuracy = metrics[stage]["accuracy"]
        assert 0.0 <= accuracy <= 1.0 and accuracy * 10 == pytest.approx(round(accuracy * 10))
    assert metrics["head_parameters"] == 32 * 2 + 2
    # 2 layers × (5 linear layers reading 32 features + 1 reading 64), blocks of 8: 28 parameters per block.
    assert metrics["adapter_parameters"] == 2 * (5 * 4 + 8) * 28
    assert metrics["trainable_parameters"] < metrics["total_parameters"]

    assert f"{metrics['before']['accuracy']:.4f}" in out and f"{metrics['after']['accuracy']:.4f}" in out
    for label in ("trainable:", "before:", "after:", "time:", "saved:"):
        assert label in out
    assert "fine-tuning" in err  # the progress bar


def test_finetune_boft_regression_on_jsonl(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_model: Path, jsonl_file: Path
) -> None:
    output = tmp_path / "boft"
    status, out, err = run_cli(
        capsys,
        "finetune",
        "--model",
        str(tiny_model),
        "--data",
        str(jsonl_file),
        "--label-column",
        "rating",
        "--method",
        "boft",
        "--block-size",
        "4",
        "--butterfly-factors",
        "2",
        "--target-modules",
        "query,value",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--output",
        str(output),
        "--quiet",
    )
    assert status == 0, err
    assert err == ""  # --quiet: no progress bar
    config = json.loads((output / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == "BOFT" and config["boft_n_butterfly_factor"] == 2
    metrics = json.loads((output / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["metric"] == "pearson_r"
    assert -1.0 <= metrics["before"]["pearson_r"] <= 1.0 and -1.0 <= metrics["after"]["pearson_r"] <= 1.0
    assert "regression" in out and "4 layers (query, value)" in out


def test_finetune_hra_trains_saves_and_merges(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_model: Path, csv_file: Path
) -> None:
    import torch

    output = tmp_path / "hra"
    status, out, err = run_cli(
        capsys,
        "finetune",
        "--model",
        str(tiny_model),
        "--data",
        str(csv_file),
        "--text-column",
        "sentence",
        "--label-column",
        "sentiment",
        "--method",
        "hra",
        "--reflections",
        "4",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
        "--output",
        str(output),
        "--merge",
        "--quiet",
    )
    assert status == 0, err
    assert "HRA on 12 layers" in out and "4 reflections per layer" in out
    config = json.loads((output / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == "HRA" and config["r"] == 4
    with safe_open(output / "adapter_model.safetensors", "pt") as adapter:
        shapes = {key: tuple(adapter.get_slice(key).get_shape()) for key in adapter.keys() if key.endswith(".hra_u")}
    assert len(shapes) == 2 * 6 and set(shapes.values()) == {(32, 4), (64, 4)}
    metrics = json.loads((output / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["adapter_parameters"] == 2 * (5 * 32 + 64) * 4

    # Training moved H away from the identity it started at (equal reflections in pairs).
    status, out, err = run_cli(capsys, "inspect", str(output), "--json")
    assert status == 0, err
    assert json.loads(out)["total"]["max_angle_degrees"] > 1e-3

    # The merged model is the adapted encoder: reload the adapter with the library and compare hidden states.
    base = transformers.BertModel.from_pretrained(tiny_model, add_pooling_layer=False).eval()
    adapted = orthotune.PeftModel.from_pretrained(base, output)
    merged = transformers.BertModel.from_pretrained(output / "merged").eval()
    tokens = torch.tensor([[2, 5, 6, 7, 3], [2, 10, 11, 3, 0]])
    with torch.no_grad():
        expected = adapted(input_ids=tokens).last_hidden_state
        got = merged(input_ids=tokens).last_hidden_state
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
