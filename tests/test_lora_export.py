"""``orthotune.export_lora`` and ``orthotune export-lora``: OFT/BOFT adapters as peft LoRA adapters.

Truths: peft 0.21.2 itself, loading the exported directory onto a fresh copy of the base model (its outputs,
and its merged weights from ``merge_and_unload``); orthotune's own merged model for the OFT side; float64
SVDs computed here (Eckart-Young) for the rank a tolerance needs.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from references import rel_err, run_cli
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, token_batch
from torch import nn

import orthotune
from orthotune.functional import low_rank_factors, rank_for_tolerance, truncation_errors
from orthotune.lora_export import REPORT_NAME

peft = pytest.importorskip("peft")
FAST = settings(max_examples=25, deadline=None)


# ------------------------------------------------------------------------------------------- functional
@FAST
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), seed=st.integers(0, 2**20), data=st.data())
def test_truncated_svd_factors_and_errors_match_the_reconstruction(rows: int, cols: int, seed: int, data) -> None:
    delta = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    errors = truncation_errors(s)
    assert errors.shape == (min(rows, cols) + 1,)
    for k in range(min(rows, cols) + 1):
        b, a = low_rank_factors(u, s, vh, k)
        assert b.shape == (rows, k) and a.shape == (k, cols)
        truncated = (u[:, :k] * s[:k]) @ vh[:k]
        assert rel_err(b @ a, truncated) < 1e-10 if k else torch.equal(b @ a, torch.zeros(rows, cols))
        assert float(torch.linalg.matrix_norm(delta - b @ a)) == pytest.approx(float(errors[k]), abs=1e-10)
    tolerance = data.draw(st.floats(0.0, 1.2)) * float(errors[0])
    k = rank_for_tolerance(s, tolerance)
    assert errors[k] <= tolerance and (k == 0 or errors[k - 1] > tolerance)


# ------------------------------------------------------------------------------------------------ models
class ConvEmbed(nn.Module):
    """Token ids (N, 2, 4) → embeddings (N, 2, 4, 4) → a strided Conv2d → a linear readout."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.head = nn.Linear(12, 5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.embed(input_ids)).flatten(1))


def _oft(targets: list[str], block_size: int, **options) -> orthotune.OFTConfig:
    return orthotune.OFTConfig(r=0, oft_block_size=block_size, target_modules=targets, init_weights=False, **options)


CASES = {
    "llama": (tiny_llama, lambda: _oft(["q_proj", "v_proj", "embed_tokens"], 8, use_cayley_neumann=False)),
    "gpt2": (tiny_gpt2, lambda: _oft(["c_attn", "c_fc"], 8, use_cayley_neumann=True)),
    "bert": (tiny_bert, lambda: _oft(["query", "value"], 4, task_type="SEQ_CLS", use_cayley_neumann=False)),
    "conv-embed": (ConvEmbed, lambda: _oft(["embed", "conv"], 2, use_cayley_neumann=False)),
    "boft-llama": (
        tiny_llama,
        lambda: orthotune.BOFTConfig(
            boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "v_proj"], init_weights=False
        ),
    ),
}


def _inputs(name: str) -> torch.Tensor:
    if name == "conv-embed":
        return torch.randint(0, 10, (3, 2, 4), generator=torch.Generator().manual_seed(0))
    return token_batch()


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = model(input_ids=x)
    return output if isinstance(output, torch.Tensor) else output.logits


def _adapted(name: str) -> tuple[orthotune.OrthoModel, torch.Tensor]:
    build, config = CASES[name]
    model = orthotune.get_peft_model(build(), config())
    if name == "bert":  # a trained head copy must travel with the export
        with torch.no_grad():
            model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    return model.eval(), _inputs(name)


def _load_in_peft(name: str, directory: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: fan_in_fan_out corrections, tiny-model config notes
        return peft.PeftModel.from_pretrained(CASES[name][0](), directory).eval()


@pytest.mark.parametrize("name", list(CASES))
def test_full_rank_export_loads_in_peft_with_the_same_outputs(name: str, tmp_path: Path) -> None:
    model, x = _adapted(name)
    expected = _outputs(model, x)
    with model.disable_adapter():
        base = _outputs(model, x)
    assert rel_err(base, expected) > 1e-3  # the adapter does something peft must reproduce
    report = orthotune.export_lora(model, tmp_path, rank=10_000)
    assert all(layer.rank == layer.full_rank for layer in report.layers)
    assert report.max_relative_error < 1e-5
    loaded = _load_in_peft(name, tmp_path)
    assert rel_err(_outputs(loaded, x), expected) < 1e-4
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"] == 10_000
    assert config["fan_in_fan_out"] == (name == "gpt2")
    capped = {layer.name: layer.full_rank for layer in report.layers}
    assert config["rank_pattern"] == capped == config["alpha_pattern"]  # lora_alpha = r everywhere: scaling 1


def test_file_layouts_are_peft_lora_layouts(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model, _ = _adapted("conv-embed")
    orthotune.export_lora(model, tmp_path, rank=2)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {key: tuple(value.shape) for key, value in tensors.items()} == {
        "base_model.model.embed.lora_embedding_A": (2, 10),  # (r, num_embeddings)
        "base_model.model.embed.lora_embedding_B": (4, 2),  # (embedding_dim, r)
        "base_model.model.conv.lora_A.weight": (2, 2, 3, 3),  # a k×k convolution to r channels
        "base_model.model.conv.lora_B.weight": (3, 2, 1, 1),  # then 1×1 to the outputs
    }


def _merged_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: model.get_submodule(name).weight.detach().double() for name in names}


@pytest.mark.parametrize(("name", "mode"), [("llama", "rank"), ("gpt2", "tolerance"), ("conv-embed", "tolerance")])
def test_stated_errors_are_what_peft_merges_and_tolerance_ranks_are_minimal(name: str, mode: str, tmp_path) -> None:
    model, _ = _adapted(name)
    names = [layer_name for layer_name, _ in model.adapter_layers()]
    tolerance = 0.02 if name == "gpt2" else 0.1
    options = {"rank": 3} if mode == "rank" else {"tolerance": tolerance}
    report = orthotune.export_lora(model, tmp_path, **options)
    ours = _merged_weights(copy.deepcopy(model).merge_and_unload(), names)
    theirs = _merged_weights(_load_in_peft(name, tmp_path).merge_and_unload(), names)
    original = _merged_weights(CASES[name][0](), names)
    ranks = set()
    for layer in report.layers:
        norm = float(torch.linalg.vector_norm(ours[layer.name]))  # Frobenius, of any layout
        measured = float(torch.linalg.vector_norm(ours[layer.name] - theirs[layer.name])) / norm
        assert layer.relative_error == pytest.approx(measured, abs=2e-6), layer.name
        # Eckart-Young in float64, from the two weights alone.
        change = ours[layer.name] - original[layer.name]  # (in, out) for Conv1D: the same singular values
        singular = torch.linalg.svdvals(change.reshape(change.shape[0], -1))
        tail = truncation_errors(singular) / norm
        assert layer.relative_change == pytest.approx(float(tail[0]), rel=1e-4)
        if mode == "rank":
            assert layer.rank == min(3, layer.full_rank)
        else:
            assert layer.relative_error <= tolerance
            assert layer.rank == 0 or float(tail[layer.rank - 1]) > tolerance * (1 - 1e-6)
        ranks.add(layer.rank)
    if mode == "tolerance":
        assert len(ranks) > 1, ranks  # the tolerance picked different ranks, so rank_pattern was exercised
    written = json.loads((tmp_path / REPORT_NAME).read_text())
    assert written == json.loads(json.dumps(report.as_dict()))
    assert written["file_bytes"] == (tmp_path / "adapter_model.safetensors").stat().st_size > 0


def test_export_includes_the_strength(tmp_path: Path) -> None:
    model, x = _adapted("llama")
    model.set_scale("default", -0.6)
    expected = _outputs(model, x)
    report = orthotune.export_lora(model, tmp_path, rank=10_000)
    assert {layer.strength for layer in report.layers} == {-0.6}
    assert rel_err(_outputs(_load_in_peft("llama", tmp_path), x), expected) < 1e-4


def test_bad_requests_raise_and_write_nothing(tmp_path: Path) -> None:
    model, _ = _adapted("llama")
    target = tmp_path / "out"
    for options, fragment in [
        ({}, "exactly one"),
        ({"rank": 4, "tolerance": 0.1}, "exactly one"),
        ({"rank": 0}, "positive integer"),
        ({"tolerance": -0.1}, "≥ 0"),
        ({"tolerance": math.nan}, "finite"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            orthotune.export_lora(model, target, **options)
    with pytest.raises(ValueError, match="adapters"):
        orthotune.export_lora(model, target, adapter_name="missing", rank=2)
    with pytest.raises(ValueError, match="every layer.*rank 0"):
        orthotune.export_lora(model, target, tolerance=0.99)
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        orthotune.export_lora(model, target, rank=2)
    biased = orthotune.get_peft_model(tiny_llama(), _oft(["q_proj"], 8, bias="oft_only"))
    with pytest.raises(ValueError, match="trains biases"):
        orthotune.export_lora(biased, target, rank=2)
    with pytest.raises(TypeError, match="OrthoModel"):
        orthotune.export_lora(tiny_llama(), target, rank=2)
    assert not target.exists()


def test_a_failed_write_keeps_the_previous_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = _adapted("llama")
    orthotune.export_lora(model, tmp_path, rank=2)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    def failing(tensors: object, path: str, metadata: object = None) -> None:
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        orthotune.export_lora(model, tmp_path, rank=4)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_pattern_keys_resolve_in_peft_to_their_own_module_only() -> None:
    """peft reads rank_pattern keys as regexes (dots match anything); a full name that would also match another
    target gets an anchored key. peft's own get_pattern_key decides."""
    from peft.utils.other import get_pattern_key

    from orthotune.lora_export import _pattern_keys, _target_modules

    targets = ["blocks.a.b", "blocks.a_b", "head"]
    keys = _pattern_keys(["blocks.a.b", "head"], targets)
    assert keys["head"] == "head" and keys["blocks.a.b"] != "blocks.a.b"
    pattern = {keys["blocks.a.b"]: 3, keys["head"]: 5}
    resolved = {name: pattern.get(get_pattern_key(list(pattern), name), 8) for name in targets}
    assert resolved == {"blocks.a.b": 3, "blocks.a_b": 8, "head": 5}
    assert _target_modules(["q", "x.k"], ["q", "x.k", "y.q"]) == "q|x\\.k"  # "q" alone would also take y.q
    assert _target_modules(["x.q"], ["x.q", "y.q"]) == ["x.q"]


# --------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, orthotune.OrthoModel]:
    """A saved tiny BertForSequenceClassification and an OFT adapter (SEQ_CLS) for it."""
    base = tmp_path_factory.mktemp("base")
    tiny_bert().save_pretrained(base)
    adapter = tmp_path_factory.mktemp("adapter")
    model = orthotune.get_peft_model(tiny_bert(), _oft(["query", "value"], 4, task_type="SEQ_CLS"))
    model.eval().save_pretrained(adapter)
    return base, adapter, model


def test_cli_export_lora_end_to_end(bert_dirs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter, model = bert_dirs
    output = tmp_path / "lora"
    status, out, err = run_cli(
        capsys, "export-lora", str(adapter), "--base", str(base), "--output", str(output), "--rank", "64"
    )
    assert status == 0, err
    assert "as LoRA at rank 64" in out and "saved:" in out and "largest relative error" in out
    assert sorted(path.name for path in output.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        REPORT_NAME,
    ]
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["task_type"] == "SEQ_CLS"
    loaded = _load_in_peft("bert", output)
    x = token_batch()
    assert rel_err(_outputs(loaded, x), _outputs(model, x)) < 1e-4

    status, out, err = run_cli(
        capsys, "export-lora", str(adapter), "--base", str(base), "--output", str(output), "--tolerance", "0.05"
    )
    assert status != 0 and "already exists" in err and "--overwrite" in err
    status, out, err = run_cli(
        capsys,
        "export-lora",
        str(adapter),
        "--base",
        str(base),
        "--output",
        str(output),
        "--tolerance",
        "0.05",
        "--overwrite",
    )
    assert status == 0, err
    report = json.loads((output / REPORT_NAME).read_text())
    assert report["tolerance"] == 0.05 and report["max_relative_error"] <= 0.05


def test_cli_export_lora_bad_input(bert_dirs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter, _ = bert_dirs
    output = tmp_path / "lora"
    common = [str(adapter), "--base", str(base), "--output", str(output)]
    for extra, fragment in [
        ([], "one of the arguments --rank --tolerance is required"),
        (["--rank", "2", "--tolerance", "0.1"], "not allowed with"),
        (["--rank", "0"], "not a positive integer"),
        (["--tolerance", "1.5"], "not a relative error"),
    ]:
        status, _, err = run_cli(capsys, "export-lora", *common, *extra)
        assert status != 0 and fragment in err, err
    status, _, err = run_cli(capsys, "export-lora", *common, "--tolerance", "0.99")
    assert status != 0 and len(err.strip().splitlines()) == 1 and "cannot export" in err and "rank 0" in err
    status, _, err = run_cli(
        capsys, "export-lora", str(tmp_path / "missing"), "--base", str(base), "--output", str(output), "--rank", "2"
    )
    assert status != 0 and "does not exist" in err
    assert not output.exists()


def test_rank_benchmark_runs_and_ranks_fall_with_the_tolerance() -> None:
    from references import load_benchmark

    results = load_benchmark("lora_export_ranks").measure(steps=3, lr=1e-2)
    exports = {row["target"]: row for row in results["exports"]}
    assert list(exports) == ["1%", "5%", "10%", "full"]
    for layer in exports["full"]["ranks"]:
        assert exports["1%"]["ranks"][layer] >= exports["5%"]["ranks"][layer] >= exports["10%"]["ranks"][layer]
    assert exports["full"]["max_relative_error"] < 1e-5
    assert all(row["file_bytes"] > 0 for row in exports.values()) and results["oft_file_bytes"] > 0
