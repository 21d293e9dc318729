"""HRA layers (:mod:`orthotune.hra`) and :class:`~orthotune.config.HRAConfig` against peft 0.21.2 and dense
references.

peft's layers are built directly from ``peft.tuners.hra.layer`` with the same ``hra_u`` copied in. Dense
references come from peft's ``get_delta_weight`` transcribed in float64 (``householder_reference``), and
Conv2d is also checked against an ``F.unfold`` model that rotates every patch, another route than ours.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import HRAConfig as PeftHRAConfig
from peft.tuners.hra.layer import HRAConv2d as PeftHRAConv2d
from peft.tuners.hra.layer import HRALinear as PeftHRALinear
from references import conv2d_unfold_reference, document_upstream_defect, rel_err
from torch import nn
from transformers.pytorch_utils import Conv1D

from orthotune.config import AdapterConfig, HRAConfig
from orthotune.hra import Conv2d, HRALayer, Linear

D = 12  # features of the test Linear layers


# ------------------------------------------------------------------------------------------- helpers
def householder_reference(u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    """peft's ``H`` (merged ``W H``) in float64, transcribed from its ``get_delta_weight``."""
    u = u.detach().double()
    eye = torch.eye(u.shape[0], dtype=torch.float64)
    if apply_gs:
        basis: list[torch.Tensor] = []
        for i in range(u.shape[1]):
            vector = u[:, i : i + 1]
            for previous in basis:
                vector = vector - (previous.t() @ vector) * previous
            basis.append(vector / vector.norm())
        q = torch.cat(basis, dim=1)
        return eye - 2 * q @ q.t()
    h = eye
    for i in range(u.shape[1]):
        unit = u[:, i : i + 1] / u[:, i].norm()
        h = h - 2 * h @ unit @ unit.t()
    return h


def peft_layer(cls: type, base: nn.Module, r: int, apply_gs: bool, name: str = "default") -> nn.Module:
    config = PeftHRAConfig(r=r, apply_GS=apply_gs, init_weights=False, target_modules=["x"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(base, name, config=config, r=r)


def copy_u(ours: HRALayer, theirs: nn.Module, name: str = "default") -> None:
    with torch.no_grad():
        ours.hra_u[name].copy_(theirs.hra_u[name])


def make(cls: type, base: nn.Module, name: str = "default", **kwargs) -> HRALayer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # odd r and apply_GS warn about the identity init
        return cls(base, name, **kwargs)


# ------------------------------------------------------------------------------------------- vs peft
@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("r", [4, 5])
def test_linear_equals_peft(apply_gs: bool, r: int) -> None:
    base = nn.Linear(D, 7)
    theirs = peft_layer(PeftHRALinear, copy.deepcopy(base), r, apply_gs)
    ours = make(Linear, base, r=r, apply_GS=apply_gs, init_weights=False)
    copy_u(ours, theirs)
    for x in (torch.randn(5, D), torch.randn(2, 3, D)):
        assert rel_err(ours(x), theirs(x)) <= 1e-5
    assert rel_err(ours.get_delta_weight("default"), theirs.get_delta_weight("default")) <= 1e-5
    assert rel_err(ours.get_delta_weight("default", reverse=True), theirs.get_delta_weight("default", True)) <= 1e-5


@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("r", [4, 5])
def test_conv2d_with_a_square_kernel_equals_peft_on_inputs_larger_than_the_kernel(apply_gs: bool, r: int) -> None:
    base = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    theirs = peft_layer(PeftHRAConv2d, copy.deepcopy(base), r, apply_gs)
    ours = make(Conv2d, base, r=r, apply_GS=apply_gs, init_weights=False)
    assert ours.hra_u["default"].shape == theirs.hra_u["default"].shape == (27, r)
    copy_u(ours, theirs)
    x = torch.randn(2, 3, 9, 7)
    assert rel_err(ours(x), theirs(x)) <= 1e-5


@pytest.mark.parametrize("apply_gs", [False, True])
def test_conv2d_with_a_non_square_kernel_equals_the_unfolded_reference(apply_gs: bool) -> None:
    base = nn.Conv2d(2, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    ours = make(Conv2d, base, r=4, apply_GS=apply_gs, init_weights=False)
    assert ours.hra_u["default"].shape == (2 * 3 * 2, 4)
    x = torch.randn(2, 2, 8, 9)
    h = householder_reference(ours.hra_u["default"], apply_gs)
    assert rel_err(ours(x), conv2d_unfold_reference(base, base.weight, base.bias, x, h.t())) <= 1e-5
    # peft sizes hra_u as in_channels·kh² and cannot run this layer at all
    theirs = peft_layer(PeftHRAConv2d, copy.deepcopy(base), 4, apply_gs)
    try:
        theirs(x)
        broken = False
    except RuntimeError:
        broken = True
    document_upstream_defect(broken, "peft HRA Conv2d breaks on non-square kernels (sizes hra_u with kh²)")


def test_init_draws_peft_values_for_the_same_seed() -> None:
    for r, init_weights in ((4, True), (4, False), (3, True)):
        torch.manual_seed(7)
        config = PeftHRAConfig(r=r, init_weights=init_weights, target_modules=["x"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = PeftHRALinear(nn.Linear(D, 3), "default", config=config, r=r)
        torch.manual_seed(7)
        ours = make(Linear, nn.Linear(D, 3), r=r, init_weights=init_weights)
        assert torch.equal(ours.hra_u["default"], theirs.hra_u["default"])


def test_several_adapters_equal_peft_and_merge_in_the_same_order() -> None:
    base = nn.Linear(D, 6)
    theirs = peft_layer(PeftHRALinear, copy.deepcopy(base), 4, False, name="a")
    theirs.update_layer("b", 3, config=PeftHRAConfig(r=3, apply_GS=True, init_weights=False, target_modules=["x"]))
    theirs.set_adapter(["a", "b"])
    ours = make(Linear, base, "a", r=4, init_weights=False)
    ours.update_layer("b", r=3, apply_GS=True, init_weights=False)
    ours.set_adapter(["a", "b"])
    copy_u(ours, theirs, "a")
    copy_u(ours, theirs, "b")
    x = torch.randn(2, 3, D)
    original = base.weight.detach().clone()
    expected = x.double() @ (original.double() @ householder_reference(ours.hra_u["a"], False)
                             @ householder_reference(ours.hra_u["b"], True)).t() + base.bias.double()  # fmt: skip
    assert rel_err(ours(x), expected) <= 1e-5
    assert rel_err(ours(x), theirs(x)) <= 1e-5
    unmerged = ours(x).detach()
    ours.merge()
    assert ours.merged_adapters == ["a", "b"]
    assert rel_err(ours(x), unmerged) <= 1e-5
    ours.unmerge()
    assert rel_err(base.weight, original) <= 1e-6
    # the other order is another model (the reflections do not commute)
    ours.set_adapter(["b", "a"])
    assert rel_err(ours(x), unmerged) > 1e-3


# ------------------------------------------------------------------------------------------ behaviour
@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d"])
def test_merged_equals_unmerged_and_unmerge_restores_the_weights(apply_gs: bool, kind: str) -> None:
    if kind == "linear":
        layer, x = make(Linear, nn.Linear(D, 5), r=4, apply_GS=apply_gs, init_weights=False), torch.randn(2, 3, D)
    elif kind == "conv1d":
        layer, x = make(Linear, Conv1D(5, D), r=4, apply_GS=apply_gs, init_weights=False), torch.randn(2, 3, D)
    else:
        conv = nn.Conv2d(2, 3, (3, 2), padding=1)
        layer, x = make(Conv2d, conv, r=5, apply_GS=apply_gs, init_weights=False), torch.randn(2, 2, 6, 5)
    original = layer.base_layer.weight.detach().clone()
    unmerged = layer(x).detach()
    layer.merge(safe_merge=True)
    assert rel_err(layer(x), unmerged) <= 1e-5
    layer.unmerge()
    assert not layer.merged
    assert rel_err(layer.base_layer.weight, original) <= 1e-5  # fp32 merge and unmerge


def test_conv1d_rotates_its_input_features() -> None:
    base = Conv1D(5, D)
    layer = make(Linear, base, r=4, init_weights=False, fan_in_fan_out=True)
    x = torch.randn(3, D)
    h = householder_reference(layer.hra_u["default"], False)
    assert rel_err(layer(x), x.double() @ h.t() @ base.weight.double() + base.bias.double()) <= 1e-5


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_even_r_starts_from_the_identity(kind: str) -> None:
    if kind == "linear":
        base, x = nn.Linear(D, 5), torch.randn(4, D)
        layer = Linear(base, "default", r=6)
    else:
        base, x = nn.Conv2d(2, 3, 3), torch.randn(2, 2, 5, 5)
        layer = Conv2d(base, "default", r=6)
    assert rel_err(layer.get_delta_weight("default"), torch.eye(layer.rotated_features)) <= 1e-6
    assert rel_err(layer(x), base(x)) <= 1e-6
    u = layer.hra_u["default"]
    assert torch.equal(u[:, 0::2], u[:, 1::2]) and u.abs().min() > 0


def test_odd_r_warns_and_starts_random_like_peft() -> None:
    base = nn.Linear(D, 5)
    with pytest.warns(UserWarning, match="r=5 is odd"):
        layer = Linear(base, "default", r=5)
    x = torch.randn(4, D)
    assert rel_err(layer(x), base(x)) > 1e-2


def test_gram_schmidt_with_the_identity_init_warns() -> None:
    with pytest.warns(UserWarning, match="init_weights=False"):
        Linear(nn.Linear(D, 5), "default", r=4, apply_GS=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Linear(nn.Linear(D, 5), "default", r=4, apply_GS=True, init_weights=False)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_only_hra_u_gets_a_gradient(kind: str) -> None:
    if kind == "linear":
        layer, x = make(Linear, nn.Linear(D, 5), r=4, init_weights=False), torch.randn(2, 3, D, requires_grad=True)
    else:
        layer = make(Conv2d, nn.Conv2d(2, 3, 3), r=4, init_weights=False)
        x = torch.randn(2, 2, 5, 5, requires_grad=True)
    layer(x).square().sum().backward()
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["hra_u.default"]
    assert layer.hra_u["default"].grad.abs().sum() > 0
    assert x.grad is not None
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None


def test_gradient_equals_peft() -> None:
    base = nn.Linear(D, 5)
    theirs = peft_layer(PeftHRALinear, copy.deepcopy(base), 4, False)
    ours = make(Linear, base, r=4, init_weights=False)
    copy_u(ours, theirs)
    x = torch.randn(3, D)
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    assert rel_err(ours.hra_u["default"].grad, theirs.hra_u["default"].grad) <= 1e-4


def test_linear_forward_keeps_one_activation_for_backward() -> None:
    n, r = 16, 4
    layer = make(Linear, nn.Linear(D, 5), r=r, init_weights=False)
    x = torch.randn(n, D, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda tensor: tensor):
        layer(x)
    activation_sized = [t for t in saved if t.numel() >= n * D and t.data_ptr() != layer.base_layer.weight.data_ptr()]
    assert [t.data_ptr() for t in activation_sized] == [x.data_ptr()]


def test_bf16_activations_and_weights() -> None:
    base = nn.Linear(64, 16).to(torch.bfloat16)
    layer = make(Linear, base, r=6, init_weights=False)
    assert layer.hra_u["default"].dtype == torch.float32  # adapter parameters stay fp32
    x = torch.randn(2, 5, 64).to(torch.bfloat16).requires_grad_(True)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    h = householder_reference(layer.hra_u["default"], False)
    expected = x.double() @ h.t() @ base.weight.double().t() + base.bias.double()
    assert rel_err(out, expected) <= 3e-2
    out.float().square().sum().backward()
    assert layer.hra_u["default"].grad.dtype == torch.float32 and torch.isfinite(layer.hra_u["default"].grad).all()


def test_mixed_batch_picks_one_adapter_per_sample() -> None:
    layer = make(Linear, nn.Linear(D, 5), "a", r=4, init_weights=False)
    layer.update_layer("b", r=2, init_weights=False)
    layer.eval()
    x = torch.randn(3, 2, D)
    out = layer(x, adapter_names=["a", "__base__", "b"])
    layer.set_adapter("a")
    assert rel_err(out[0], layer(x[:1])[0]) <= 1e-6
    layer.set_adapter("b")
    assert rel_err(out[2], layer(x[2:])[0]) <= 1e-6
    assert rel_err(out[1], layer.base_layer(x[1])) <= 1e-6


def test_file_tensors_are_the_parameters_under_peft_names() -> None:
    layer = make(Conv2d, nn.Conv2d(2, 3, (3, 2)), r=4, init_weights=False)
    tensors = layer.adapter_tensors("default")
    assert list(tensors) == ["hra_u"] and tensors["hra_u"] is layer.hra_u["default"]
    assert tensors["hra_u"].shape == (12, 4)
    theirs = peft_layer(PeftHRALinear, nn.Linear(D, 3), 2, False)
    assert "hra_u" in {key.replace(".default", "") for key in theirs.state_dict()}


def test_delete_adapter_removes_its_settings() -> None:
    layer = make(Linear, nn.Linear(D, 5), "a", r=4)
    layer.update_layer("b", r=2, apply_GS=True, init_weights=False)
    layer.delete_adapter("a")
    assert layer.adapter_names == ["b"] and layer.hra_r == {"b": 2} and layer.hra_apply_GS == {"b": True}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, r"r=0 must be an integer ≥ 1"),
        ({"r": 13, "apply_GS": True, "init_weights": False}, r"r=13 with apply_GS=True.*r ≤ 12"),
        ({"apply_GS": "yes"}, r"apply_GS='yes'"),
        ({"init_weights": "gaussian"}, r"init_weights='gaussian'"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Linear(nn.Linear(D, 5), "default", **kwargs)


def test_unsupported_layers_are_refused() -> None:
    with pytest.raises(TypeError, match="cannot adapt Embedding"):
        Linear(nn.Embedding(10, D), "default")
    with pytest.raises(TypeError, match="cannot adapt Conv2d"):
        Linear(nn.Conv2d(2, 3, 3), "default")
    with pytest.raises(TypeError, match="cannot adapt Linear"):
        Conv2d(nn.Linear(D, 3), "default")
    with pytest.raises(ValueError, match="groups=2"):
        Conv2d(nn.Conv2d(4, 4, 3, groups=2), "default")
    with pytest.raises(TypeError, match="unexpected HRA arguments"):
        Linear(nn.Linear(D, 5), "default").update_layer("b", r=2, block_size=4)


# -------------------------------------------------------------------------------------------- config
def test_config_defaults_equal_peft() -> None:
    ours, theirs = HRAConfig(), PeftHRAConfig()
    for name in ("r", "apply_GS", "init_weights", "target_modules", "exclude_modules", "layers_to_transform",
                 "layers_pattern", "bias", "modules_to_save"):  # fmt: skip
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.peft_type == "HRA"
    assert ours.layer_kwargs() == {"r": 8, "apply_GS": False, "init_weights": True, "inference_mode": False}


def test_config_files_round_trip_with_peft(tmp_path) -> None:
    ours = HRAConfig(r=6, apply_GS=True, init_weights=False, bias="hra_only", target_modules=["q", "v"])
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft warns about keys it does not know
        theirs = PeftHRAConfig.from_pretrained(tmp_path / "ours")
    assert (theirs.r, theirs.apply_GS, theirs.init_weights, theirs.bias) == (6, True, False, "hra_only")
    assert theirs.target_modules == {"q", "v"}
    PeftHRAConfig(r=4, apply_GS=True, target_modules=["k"]).save_pretrained(tmp_path / "peft")
    back = AdapterConfig.from_pretrained(tmp_path / "peft")
    assert isinstance(back, HRAConfig) and (back.r, back.apply_GS, back.target_modules) == (
        4,
        True,
        {"k"},
    )  # peft turns a list into a set
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == "HRA"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, r"r=0"),
        ({"r": 2.5}, r"r=2.5"),
        ({"apply_GS": 1}, r"apply_GS=1"),
        ({"bias": "oft_only"}, r"'hra_only'"),
        ({"layers_pattern": "layers"}, r"layers_to_transform"),
    ],
)
def test_config_refuses_bad_values_by_name(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HRAConfig(**kwargs)


def test_compiles_without_graph_breaks_and_matches_eager() -> None:
    layer = make(Linear, nn.Linear(D, 5), r=4, init_weights=False)
    x = torch.randn(3, D, requires_grad=True)
    eager = layer(x)
    (eager_grad,) = torch.autograd.grad(eager.square().sum(), layer.hra_u["default"])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    (compiled_grad,) = torch.autograd.grad(compiled.square().sum(), layer.hra_u["default"])
    assert rel_err(compiled, eager) <= 1e-6 and rel_err(compiled_grad, eager_grad) <= 1e-6
