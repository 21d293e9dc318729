"""``orthotune merge``, ``inspect`` and ``convert`` on tiny transformers models built from configs (no downloads).

Truths compared against: the adapted model's own outputs (merge), dense ``RᵀR − I`` and eigenvalues computed here
from the file's tensors (inspect), a direct double loop for the hyperspherical energy, and the file's shapes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from references import run_cli
from test_hra_model import peft_dense_h

import orthotune
from orthotune.checkpoint import read_adapter_files
from orthotune.functional import skew_from_packed
from orthotune.inspection import hyperspherical_energy, hyperspherical_energy_change, neuron_sample

transformers = pytest.importorskip("transformers")


def _bert_config() -> object:
    return transformers.BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
    )


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BertForSequenceClassification (width 32) with a WordPiece vocabulary, saved to a directory."""
    directory = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(_bert_config()).save_pretrained(directory)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    return directory


def _load_base(directory: Path) -> torch.nn.Module:
    return transformers.BertForSequenceClassification.from_pretrained(directory).eval()


def _train_like(model: orthotune.OrthoModel, scale: float) -> None:
    """Random adapter values of a given size, as training would leave (init_weights=True starts at identity)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and ("oft_R" in name or "boft_R" in name):
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
            elif parameter.requires_grad and "boft_s" in name:
                parameter.copy_(1 + 0.1 * torch.randn(parameter.shape, generator=generator))
            elif parameter.requires_grad:  # a trained copy of the head (modules_to_save)
                parameter.add_(torch.randn(parameter.shape, generator=generator))


def _make_adapter(base_dir: Path, out: Path, config: object, scale: float = 0.3) -> orthotune.OrthoModel:
    model = orthotune.get_peft_model(_load_base(base_dir), config)
    _train_like(model, scale)
    model.eval()
    model.save_pretrained(out)
    return model


INPUTS = {
    "input_ids": torch.tensor([[2, 5, 6, 7, 9, 3], [2, 11, 12, 3, 0, 0]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
}


# ------------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize(
    "config",
    [
        orthotune.OFTConfig(
            oft_block_size=8, target_modules=["query", "value", "dense"], use_cayley_neumann=False, task_type="SEQ_CLS"
        ),
        orthotune.BOFTConfig(
            boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["query", "value"], task_type="SEQ_CLS"
        ),
    ],
    ids=["oft-exact-seqcls", "boft-m2"],
)
def test_merge_saved_model_gives_adapted_outputs(
    base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], config: object
) -> None:
    adapted = _make_adapter(base_dir, tmp_path / "adapter", config)
    with torch.no_grad():
        expected_out = adapted(**INPUTS, output_hidden_states=True)
    expected, expected_hidden = expected_out.logits, expected_out.hidden_states[-1]
    status, out, err = run_cli(
        capsys, "merge", str(tmp_path / "adapter"), "--base", str(base_dir), "--output", str(tmp_path / "merged")
    )
    assert status == 0, err
    assert "saved:" in out
    saved = tmp_path / "merged"
    assert (saved / "config.json").is_file() and (saved / "vocab.txt").is_file()
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(saved).eval()
    assert not any("oft" in name for name, _ in reloaded.named_parameters())
    with torch.no_grad():
        actual = reloaded(**INPUTS, output_hidden_states=True)
    torch.testing.assert_close(actual.logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual.hidden_states[-1], expected_hidden, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the adapter really did something
        plain = _load_base(base_dir)(**INPUTS, output_hidden_states=True).hidden_states[-1]
    assert (plain - expected_hidden).abs().max() > 1e-2
    assert not list(tmp_path.glob(".merged.*"))  # no staging leftovers


def test_merge_without_task_type_uses_the_architecture(
    base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = orthotune.OFTConfig(oft_block_size=8, target_modules=["query", "value"])  # Neumann, no task_type
    adapted = _make_adapter(base_dir, tmp_path / "adapter", config, scale=0.05)
    with torch.no_grad():
        expected = adapted(**INPUTS).logits
    status, _, err = run_cli(
        capsys, "merge", str(tmp_path / "adapter"), "--base", str(base_dir), "--output", str(tmp_path / "merged")
    )
    assert status == 0, err
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**INPUTS).logits, expected, rtol=1e-5, atol=1e-5)


def test_merge_bad_input_is_one_line_and_writes_nothing(
    base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = tmp_path / "adapter"
    _make_adapter(base_dir, adapter, orthotune.OFTConfig(oft_block_size=8, target_modules=["query"]), scale=0.05)
    cases = [
        (str(tmp_path / "missing"), str(base_dir), "does not exist"),
        (str(adapter), str(tmp_path / "missing"), "does not exist"),
    ]
    for adapter_arg, base_arg, words in cases:
        status, out, err = run_cli(capsys, "merge", adapter_arg, "--base", base_arg, "--output", str(tmp_path / "o"))
        assert status != 0 and words in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("keep")
    status, _, err = run_cli(capsys, "merge", str(adapter), "--base", str(base_dir), "--output", str(existing))
    assert status != 0 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert [path.name for path in existing.iterdir()] == ["keep.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter", "existing"]
    status, _, err = run_cli(
        capsys, "merge", str(adapter), "--base", str(base_dir), "--output", str(existing), "--overwrite"
    )
    assert status == 0, err
    assert (existing / "config.json").is_file() and not (existing / "keep.txt").exists()


def test_merge_refuses_an_adapter_for_another_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Model(
        transformers.GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    ).save_pretrained(gpt2)
    bert = tmp_path / "bert"
    transformers.BertModel(_bert_config()).save_pretrained(bert)
    orthotune.get_peft_model(
        transformers.BertModel.from_pretrained(bert), orthotune.OFTConfig(oft_block_size=8, target_modules=["query"])
    ).save_pretrained(tmp_path / "adapter")
    status, _, err = run_cli(
        capsys, "merge", str(tmp_path / "adapter"), "--base", str(gpt2), "--output", str(tmp_path / "o")
    )
    assert status != 0 and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- inspect
def _dense_oft_truth(adapter: Path) -> tuple[float, float]:
    """Orthogonality error and largest angle of the OFT rotation, built densely here from the raw file."""
    from safetensors.torch import load_file

    raw = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    errors, angles = [], []
    for key, packed in tensors.items():
        if not key.endswith("oft_R.weight"):
            continue
        b = int((1 + math.isqrt(1 + 8 * packed.shape[-1])) // 2)
        q = skew_from_packed(packed.double(), b)
        if not raw["use_cayley_neumann"]:
            q = -q  # peft's exact-mode files hold negated generators
        eye = torch.eye(b, dtype=torch.float64)
        if raw["use_cayley_neumann"]:
            n = raw["num_cayley_neumann_terms"]
            rotation = (
                eye
                + 2 * sum(torch.linalg.matrix_power(q, k) for k in range(1, n - 1))
                + torch.linalg.matrix_power(q, n - 1)
            )
        else:
            rotation = (eye + q) @ torch.linalg.inv(eye - q)
        dense = torch.block_diag(*rotation)
        errors.append(float(torch.linalg.matrix_norm(dense.T @ dense - torch.eye(dense.shape[0]).double(), ord=2)))
        angles.append(math.degrees(float(torch.linalg.eigvals(dense).angle().abs().max())))
    return max(errors), max(angles)


@pytest.mark.parametrize("neumann", [False, True], ids=["exact", "neumann"])
def test_inspect_matches_dense_computation(
    base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], neumann: bool
) -> None:
    adapter = tmp_path / "adapter"
    config = orthotune.OFTConfig(oft_block_size=8, target_modules=["query", "value"], use_cayley_neumann=neumann)
    _make_adapter(base_dir, adapter, config, scale=0.15)
    status, out, err = run_cli(capsys, "inspect", str(adapter), "--json")
    assert status == 0, err
    report = json.loads(out)
    error, angle = _dense_oft_truth(adapter)
    assert len(report["layers"]) == 4
    layer = report["layers"][0]
    assert (layer["method"], layer["block_size"], layer["num_blocks"], layer["butterfly_factors"]) == ("OFT", 8, 4, 1)
    assert layer["parameters"] == 4 * 28
    assert report["total"]["adapter_parameters"] == 4 * 4 * 28
    assert report["total"]["orthogonality_error"] == pytest.approx(error, rel=1e-3, abs=1e-12)
    assert report["total"]["max_angle_degrees"] == pytest.approx(angle, rel=1e-6)
    assert angle > 1.0  # a real rotation, not the identity
    if neumann:
        assert error > 1e-6  # a truncated series is visibly not orthogonal at this scale
    else:
        assert error < 1e-12


def test_inspect_flags_neumann_near_divergence(
    base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = tmp_path / "adapter"
    config = orthotune.OFTConfig(oft_block_size=8, target_modules=["query"], use_cayley_neumann=True)
    _make_adapter(base_dir, adapter, config, scale=0.5)  # ‖packed‖₂ ≈ 0.5·√28 > 0.9
    status, out, _ = run_cli(capsys, "inspect", str(adapter))
    assert status == 0
    assert "near divergence" in out and "warning:" in out
    status, out, _ = run_cli(capsys, "inspect", str(adapter), "--json")
    assert all(layer["neumann_near_divergence"] for layer in json.loads(out)["layers"])


def test_inspect_boft_reports_factors_and_energy(
    base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = tmp_path / "adapter"
    config = orthotune.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["query", "value"])
    adapted = _make_adapter(base_dir, adapter, config)
    status, out, err = run_cli(capsys, "inspect", str(adapter), "--base", str(base_dir), "--json")
    assert status == 0, err
    report = json.loads(out)
    layer = report["layers"][0]
    assert (layer["method"], layer["butterfly_factors"], layer["block_size"], layer["num_blocks"]) == ("BOFT", 2, 4, 8)
    assert layer["parameters"] == 2 * 8 * 16 + 32
    assert layer["orthogonality_error"] < 1e-12
    # Energy: against a direct double loop over the neurons of the base and merged weights.
    name = layer["name"]
    base_weight = _load_base(base_dir).get_submodule(name).weight.detach()
    merged_weight = adapted.merge_and_unload().get_submodule(name).weight.detach()

    def direct(weight: torch.Tensor) -> float:
        rows = torch.nn.functional.normalize(weight.double(), dim=1)
        return sum(
            1 / float(torch.linalg.vector_norm(rows[i] - rows[j]))
            for i in range(rows.shape[0])
            for j in range(rows.shape[0])
            if i != j
        )

    energy = layer["energy"]
    assert energy["base"] == pytest.approx(direct(base_weight), rel=1e-9)
    assert energy["merged"] == pytest.approx(direct(merged_weight), rel=1e-9)
    assert abs(energy["relative_change"]) < 1e-6
    assert (merged_weight - base_weight).abs().max() > 1e-3  # the weights did change
    assert report["total"]["max_abs_relative_energy_change"] < 1e-6
    status, out, err = run_cli(capsys, "inspect", str(adapter), "--base", str(base_dir))
    assert status == 0 and "ΔHE" in out and "boft_R" not in out


@pytest.mark.parametrize(
    ("options", "trained"),
    [({"r": 4}, True), ({"r": 5}, True), ({"r": 4, "apply_GS": True}, True), ({"r": 4}, False)],
    ids=["r4", "odd-r5", "gram-schmidt", "identity-init"],
)
def test_inspect_hra_matches_peft_s_dense_h(
    options: dict, trained: bool, base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = tmp_path / "adapter"
    config = orthotune.HRAConfig(target_modules=["query", "value"], init_weights=not trained, **options)
    model = orthotune.get_peft_model(_load_base(base_dir), config)
    model.save_pretrained(adapter)
    with_base = options == {"r": 4} and trained
    status, out, err = run_cli(
        capsys, "inspect", str(adapter), "--json", *(["--base", str(base_dir)] if with_base else [])
    )
    assert status == 0, err
    report = json.loads(out)
    layers = dict(model.adapter_layers())
    assert {layer["name"] for layer in report["layers"]} == set(layers) and len(layers) == 4
    for layer in report["layers"]:
        u = layers[layer["name"]].hra_u["default"].detach().double()
        h = peft_dense_h(u, options.get("apply_GS", False))
        eye = torch.eye(32, dtype=torch.float64)
        assert (layer["method"], layer["block_size"], layer["reflections"], layer["parameters"]) == (
            "HRA",
            32,
            options["r"],
            32 * options["r"],
        )
        assert layer["max_angle_degrees"] == pytest.approx(
            math.degrees(float(torch.linalg.eigvals(h).angle().abs().max())), rel=1e-6, abs=1e-6
        )
        assert layer["orthogonality_error"] < 1e-12 and float(torch.linalg.matrix_norm(h.T @ h - eye, ord=2)) < 1e-12
        assert layer["distance_from_identity"] == pytest.approx(float(torch.linalg.matrix_norm(h - eye)), abs=1e-9)
        norms = torch.linalg.vector_norm(u, dim=0)
        assert layer["max_generator_norm"] == pytest.approx(float(norms.max()), rel=1e-12)
        assert layer["vector_norm_range"] == pytest.approx([float(norms.min()), float(norms.max())], rel=1e-12)
    angle = report["total"]["max_angle_degrees"]
    if options["r"] % 2 or options.get("apply_GS"):
        assert angle == pytest.approx(180.0) and any("180°" in note for note in report["notes"])
    elif trained:
        assert 1.0 < angle < 180.0
    else:
        assert angle < 1e-6  # the identity
    if with_base:
        assert report["total"]["max_abs_relative_energy_change"] < 1e-6
    status, out, err = run_cli(capsys, "inspect", str(adapter))
    built_by = "gram-schmidt ×" if options.get("apply_GS") else "householder ×"
    assert status == 0 and "max‖u_i‖" in out and f"{built_by}{options['r']}" in out


def test_energy_subsamples_deterministically() -> None:
    index = neuron_sample(10_000, 64)
    assert index.numel() == 64 and index[0] == 0 and index[-1] == 9_999
    assert torch.equal(index, neuron_sample(10_000, 64))
    weight = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
    change = hyperspherical_energy_change(weight, weight @ rotation.T, max_neurons=100)
    assert change["sampled"] == 100 and change["neurons"] == 300 and abs(change["relative_change"]) < 1e-6
    skewed = weight.clone()
    skewed[:, 0] *= 5  # not a rotation: the energy moves
    assert abs(hyperspherical_energy_change(weight, skewed)["relative_change"]) > 1e-3
    assert hyperspherical_energy(torch.eye(3)) == pytest.approx(6 / math.sqrt(2))


def test_inspect_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_cli(capsys, "inspect", str(tmp_path / "missing"))
    assert status != 0 and "does not exist" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    status, _, err = run_cli(capsys, "inspect", str(tmp_path / "empty"))
    assert status != 0 and "adapter_config.json" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- convert
def test_convert_refuses_lycoris_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    source = tmp_path / "lycoris.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attn1_to_q.oft_blocks": torch.zeros(4, 8, 8),
            "lora_unet_down_blocks_0_attn1_to_q.alpha": torch.tensor(1e-3),
        },
        str(source),
    )
    status, _, err = run_cli(capsys, "convert", str(source), "--output", str(tmp_path / "out"))
    assert status != 0 and "outputs" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_convert_peft_roundtrip_and_refuses_lycoris_target(
    base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = tmp_path / "adapter"
    _make_adapter(
        base_dir, adapter, orthotune.OFTConfig(oft_block_size=8, target_modules=["query"], use_cayley_neumann=False)
    )
    status, _, err = run_cli(capsys, "convert", str(adapter), "--to", "lycoris", "--output", str(tmp_path / "l"))
    assert status != 0 and "inputs" in err and not (tmp_path / "l").exists()
    status, _, err = run_cli(capsys, "convert", str(adapter), "--output", str(tmp_path / "p"))
    assert status == 0, err
    before, after = read_adapter_files(adapter), read_adapter_files(tmp_path / "p")
    assert before.tensors.keys() == after.tensors.keys()
    assert all(torch.equal(before.tensors[key], after.tensors[key]) for key in before.tensors)


def test_convert_old_peft_oft_file_needs_base_and_keeps_outputs(
    base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    old = tmp_path / "old"
    old.mkdir()
    config = {
        "peft_type": "OFT",
        "r": 0,
        "oft_block_size": 8,
        "target_modules": ["query"],
        "coft": False,
        "eps": 6e-5,
        "block_share": False,
        "module_dropout": 0.0,
        "bias": "none",
        "init_weights": True,
    }
    (old / "adapter_config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    save_file(
        {
            f"base_model.model.bert.encoder.layer.{i}.attention.self.query.{key}": value
            for i in (0, 1)
            for key, value in (
                ("oft_r", 0.2 * torch.randn(4, 8, 8, generator=generator)),
                ("oft_s", 1 + 0.1 * torch.randn(32, 1, generator=generator)),
            )
        },
        str(old / "adapter_model.safetensors"),
    )
    status, _, err = run_cli(capsys, "convert", str(old), "--output", str(tmp_path / "new"))
    assert status != 0 and "--base" in err and not (tmp_path / "new").exists()
    status, _, err = run_cli(capsys, "convert", str(old), "--base", str(base_dir), "--output", str(tmp_path / "new"))
    assert status == 0, err
    assert read_adapter_files(tmp_path / "new").config.peft_type == "BOFT"
    with torch.no_grad():
        expected = orthotune.PeftModel.from_pretrained(_load_base(base_dir), old)(**INPUTS).logits
        actual = orthotune.PeftModel.from_pretrained(_load_base(base_dir), tmp_path / "new")(**INPUTS).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
