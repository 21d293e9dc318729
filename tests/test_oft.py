"""OFT layers (:mod:`orthotune.oft`): the spec's API, exactness against dense references, and peft 0.21.2.

References are built from the packed parameters in float64 (``references.rotation_reference``) and from the
original base weights, never from the layer's own rotation; Conv2d is checked against an ``F.unfold`` model.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from peft import OFTConfig
from peft.tuners.oft import layer as peft_oft
from references import (
    conv2d_unfold_reference,
    dense_block_diag,
    document_upstream_defect,
    rel_err,
    rotation_reference,
    skew_reference,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from orthotune.oft import Conv2d, Embedding, Linear, OFTLayer

D = 12  # width every test layer rotates: Linear in, Conv1D nx, Embedding dim, Conv2d 2·(3×2)
MODES = {"exact": {"use_cayley_neumann": False}, "neumann": {"use_cayley_neumann": True}}


# ------------------------------------------------------------------------------------------- helpers
def set_random_packed(layer: OFTLayer, name: str, scale: float, seed: int = 0) -> torch.Tensor:
    """Fill adapter ``name`` with N(0, scale²) generators; return a copy of them."""
    weight = layer.oft_R[name].weight
    packed = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) * scale
    with torch.no_grad():
        weight.copy_(packed)
    return packed.clone()


def reference_rotation(layer: OFTLayer, name: str, features: int = D) -> torch.Tensor:
    """Dense float64 ``R`` of adapter ``name`` from its packed parameters (exact Cayley)."""
    block_size = layer.oft_block_size[name]
    return rotation_reference(layer.oft_R[name].weight, block_size, features // block_size)


@dataclass
class Case:
    """A wrapped layer, an input, and its output as a function of the active dense rotations."""

    layer: OFTLayer
    x: torch.Tensor
    reference: Callable[[list[torch.Tensor]], torch.Tensor]  # rotations in active order → float64 output
    original_weight: torch.Tensor

    def weight(self) -> torch.Tensor:
        return self.layer.base_layer.weight


def _input_side(rotations: list[torch.Tensor]) -> torch.Tensor:
    """The first active adapter sits next to the base layer: x R_last ⋯ R_first."""
    total = torch.eye(D, dtype=torch.float64)
    for rotation in reversed(rotations):
        total = total @ rotation
    return total


def build(kind: str, block_size: int = 4, **kwargs) -> Case:
    """One wrapped layer of each kind, all rotating D = 12 features."""
    if kind == "linear":
        base = nn.Linear(D, 5)
        layer = Linear(base, "a", r=0, oft_block_size=block_size, **kwargs)
        x = torch.randn(2, 3, D)
        w, b = base.weight.detach().clone(), base.bias.detach().clone()
        return Case(layer, x, lambda rs: x.double() @ _input_side(rs) @ w.double().T + b.double(), w)
    if kind == "conv1d":
        base = Conv1D(5, D)  # transformers' GPT-2 layer: y = x W + b with W (in, out)
        nn.init.normal_(base.weight)
        layer = Linear(base, "a", r=0, oft_block_size=block_size, fan_in_fan_out=True, **kwargs)
        x = torch.randn(4, D)
        w, b = base.weight.detach().clone(), base.bias.detach().clone()
        return Case(layer, x, lambda rs: x.double() @ _input_side(rs) @ w.double() + b.double(), w)
    if kind == "embedding":
        base = nn.Embedding(10, D)
        layer = Embedding(base, "a", r=0, oft_block_size=block_size, **kwargs)
        x = torch.randint(0, 10, (2, 5))
        w = base.weight.detach().clone()

        def embedding_reference(rs: list[torch.Tensor]) -> torch.Tensor:
            out = w.double()[x]
            for rotation in rs:  # outputs: E R_first ⋯ R_last
                out = out @ rotation
            return out

        return Case(layer, x, embedding_reference, w)
    if kind == "conv2d":
        base = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1))
        layer = Conv2d(base, "a", r=0, oft_block_size=block_size, **kwargs)
        x = torch.randn(2, 2, 9, 8)
        w, b = base.weight.detach().clone(), base.bias.detach().clone()
        return Case(layer, x, lambda rs: conv2d_unfold_reference(base, w, b, x, _input_side(rs)), w)
    raise AssertionError(kind)


KINDS = ["linear", "conv1d", "embedding", "conv2d"]


def peft_layer(cls: type, base: nn.Module, block_size: int, name: str = "default", **config_kwargs) -> nn.Module:
    config = OFTConfig(r=0, oft_block_size=block_size, target_modules=["x"], **config_kwargs)
    return cls(base, name, config=config, r=0)


def peft_parameter(layer: nn.Module, name: str = "default") -> nn.Parameter:
    holder = layer.oft_R if name in layer.oft_R else layer.oft_embedding_R
    return holder[name].weight


# ------------------------------------------------------------------------------------ API of the spec
@pytest.mark.parametrize("cls", [Linear, Conv2d, Embedding])
def test_constructor_arguments_and_defaults_are_the_specs(cls: type) -> None:
    parameters = inspect.signature(cls.__init__).parameters
    expected = {
        "r": 8,
        "oft_block_size": 0,
        "module_dropout": 0.0,
        "coft": False,
        "eps": 6e-5,
        "block_share": False,
        "use_cayley_neumann": False,
        "num_cayley_neumann_terms": 5,
        "init_weights": True,
        "fan_in_fan_out": False,
    }
    assert list(parameters)[:3] == ["self", "base_layer", "adapter_name"]
    assert {name: parameters[name].default for name in expected} == expected
    assert issubclass(cls, OFTLayer)


def test_update_layer_takes_the_specs_arguments() -> None:
    parameters = list(inspect.signature(OFTLayer.update_layer).parameters)
    assert parameters[:12] == [
        "self", "adapter_name", "r", "oft_block_size", "module_dropout", "coft", "eps", "block_share",
        "init_weights", "use_cayley_neumann", "num_cayley_neumann_terms", "inference_mode",
    ]  # fmt: skip
    assert OFTLayer.adapter_layer_names == ("oft_R",)
    assert OFTLayer.other_param_names == ("r", "oft_block_size", "oft_dropout")


@pytest.mark.parametrize(
    ("kwargs", "r", "block_size", "stored"),
    [
        ({"r": 4}, 4, 6, 4),
        ({"r": 0, "oft_block_size": 3}, 8, 3, 8),
        ({"r": 4, "block_share": True}, 4, 6, 1),
        ({"r": 0, "oft_block_size": 8, "block_share": True}, 3, 8, 1),
    ],
)
def test_parameters_are_packed_upper_triangles_per_block(kwargs: dict, r: int, block_size: int, stored: int) -> None:
    layer = Linear(nn.Linear(24, 5), "a", **kwargs)
    assert isinstance(layer.oft_R, nn.ModuleDict) and isinstance(layer.r, dict)
    assert isinstance(layer.oft_block_size, dict)
    assert layer.oft_R["a"].weight.shape == (stored, block_size * (block_size - 1) // 2)
    assert layer.r["a"] == r and layer.oft_block_size["a"] == block_size


def test_conv2d_rotates_in_channels_times_kernel_features_and_embedding_its_dim() -> None:
    conv = Conv2d(nn.Conv2d(2, 3, (3, 2)), "a", r=0, oft_block_size=4)
    assert (conv.r["a"], conv.oft_block_size["a"]) == (3, 4)  # 2·3·2 = 12 features
    assert (conv.in_features, conv.out_features) == (2, 3)
    embedding = Embedding(nn.Embedding(10, 12), "a", r=3)
    assert (embedding.oft_block_size["a"], embedding.in_features, embedding.out_features) == (4, 12, 10)
    assert embedding.oft_embedding_R is embedding.oft_R


# ------------------------------------------------------------------------------- adjusting and errors
@pytest.mark.parametrize("features", [12, 30, 64, 97, 768])
def test_adjust_oft_parameters_equals_peft_for_every_value(features: int) -> None:
    layer = Linear(nn.Linear(4, 4), "a", r=2)
    for value in range(1, features + 3):
        assert layer.adjust_oft_parameters(features, value) == peft_oft.OFTLayer.adjust_oft_parameters(
            None, features, value
        ), value


@pytest.mark.parametrize(
    ("features", "argument", "value", "adjusted"),
    [
        (12, "oft_block_size", 5, 4),  # 4 and 6 tie: the lower wins
        (30, "oft_block_size", 4, 3),  # 3 and 5 tie
        (768, "oft_block_size", 30, 32),
        (768, "r", 7, 6),
        (64, "r", 100, 64),
        (64, "oft_block_size", 65, 64),
        (97, "r", 50, 97),  # prime: 1 is 49 away, 97 is 47 away
    ],
)
def test_non_dividing_value_moves_to_nearest_divisor_with_a_warning_like_peft(
    features: int, argument: str, value: int, adjusted: int
) -> None:
    kwargs = {"r": value} if argument == "r" else {"r": 0, "oft_block_size": value}
    with pytest.warns(UserWarning, match=argument):
        layer = Linear(nn.Linear(features, 3), "a", **kwargs)
    peft_r = value if argument == "r" else 0
    config = OFTConfig(r=peft_r, oft_block_size=0 if peft_r else value, target_modules=["x"])
    with pytest.warns(UserWarning):
        peft = peft_oft.Linear(nn.Linear(features, 3), "default", config=config, r=peft_r)
    ours = layer.r["a"] if argument == "r" else layer.oft_block_size["a"]
    theirs = peft.r["default"] if argument == "r" else peft.oft_block_size["default"]
    assert ours == adjusted == theirs
    assert layer.r["a"] * layer.oft_block_size["a"] == features


def test_dividing_values_are_used_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Linear(nn.Linear(12, 3), "a", r=0, oft_block_size=3)
        Linear(nn.Linear(12, 3), "a", r=6)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"r": 0, "oft_block_size": 0}, "oft_block_size=0"),
        ({"r": -1}, "r=-1"),
        ({"r": 0, "oft_block_size": -2}, "oft_block_size=-2"),
        ({"r": 2, "oft_block_size": 4}, "oft_block_size=4"),  # 2·4 ≠ 12
        ({"r": 4, "module_dropout": 1.0}, "module_dropout=1.0"),
        ({"r": 4, "module_dropout": -0.1}, "module_dropout=-0.1"),
        ({"r": 4, "use_cayley_neumann": True, "num_cayley_neumann_terms": 1}, "num_cayley_neumann_terms=1"),
        ({"r": 4, "init_weights": "foo"}, "init_weights='foo'"),
        ({"r": 4, "coft": True, "eps": 0.0}, "eps=0.0"),
    ],
)
def test_nonsense_arguments_raise_value_error_naming_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument.replace("(", r"\(")):
        Linear(nn.Linear(12, 3), "a", **kwargs)


@pytest.mark.parametrize("existing", [False, True])
def test_rejected_update_layer_leaves_the_layer_unchanged(existing: bool) -> None:
    layer = Linear(nn.Linear(12, 3), "a", r=4, init_weights=False)
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    name = "a" if existing else "b"
    with pytest.raises(ValueError, match="init_weights"):
        layer.update_layer(name, r=0, oft_block_size=3, init_weights="foo")
    assert layer.adapter_names == ["a"] and layer.active_adapters == ["a"]
    assert layer.r == {"a": 4} and layer.oft_block_size == {"a": 3}
    after = dict(layer.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_grouped_conv2d_is_refused_naming_groups() -> None:
    with pytest.raises(ValueError, match="groups=2"):
        Conv2d(nn.Conv2d(4, 4, 3, groups=2), "a", r=0, oft_block_size=4)


@pytest.mark.parametrize("module", [nn.ReLU(), nn.LayerNorm(8), nn.Conv1d(2, 2, 3)])
def test_unsupported_module_raises_type_error(module: nn.Module) -> None:
    with pytest.raises(TypeError, match=type(module).__name__):
        Linear(module, "a", r=2)


# ----------------------------------------------------------------------------------- identity at init
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_output_equals_base_output_at_init(kind: str, mode: str) -> None:
    case = build(kind, **MODES[mode])
    assert torch.count_nonzero(case.layer.oft_R["a"].weight) == 0
    expected = case.layer.base_layer(case.x)
    torch.testing.assert_close(case.layer(case.x), expected, rtol=0, atol=1e-6)


def test_reset_oft_parameters_true_gives_zeros_false_gives_small_random() -> None:
    layer = Linear(nn.Linear(12, 3), "a", r=0, oft_block_size=4, init_weights=False)
    weight = layer.oft_R["a"].weight
    assert torch.count_nonzero(weight) == weight.numel() and weight.abs().max() < 1.0
    layer.reset_oft_parameters("a", True)
    assert torch.equal(weight, torch.zeros_like(weight))


# ---------------------------------------------------------------------------- unmerged == merged
@pytest.mark.parametrize("block_share", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_equals_dense_reference_and_merged_forward(kind: str, block_share: bool) -> None:
    case = build(kind, block_share=block_share)
    set_random_packed(case.layer, "a", scale=0.5)
    expected = case.reference([reference_rotation(case.layer, "a")])
    unmerged = case.layer(case.x)
    assert rel_err(unmerged, expected) <= 1e-5
    case.layer.merge()
    merged = case.layer(case.x)
    assert rel_err(merged, expected) <= 1e-5
    assert rel_err(merged, unmerged) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_neumann_forward_equals_merged_forward(kind: str) -> None:
    case = build(kind, use_cayley_neumann=True)
    set_random_packed(case.layer, "a", scale=0.25)
    unmerged = case.layer(case.x)
    assert rel_err(unmerged, case.reference([torch.eye(D, dtype=torch.float64)])) > 1e-3  # not the identity
    case.layer.merge()
    assert rel_err(case.layer(case.x), unmerged) <= 1e-5


@pytest.mark.parametrize("shape", [(D,), (1, D), (7, D), (2, 3, D), (2, 3, 2, D)])
def test_linear_handles_any_batch_shape(shape: tuple[int, ...]) -> None:
    base = nn.Linear(D, 5)
    w, b = base.weight.detach().clone().double(), base.bias.detach().clone().double()
    layer = Linear(base, "a", r=0, oft_block_size=3)
    set_random_packed(layer, "a", scale=0.5)
    x = torch.randn(shape)
    out = layer(x)
    assert out.shape == (*shape[:-1], 5)
    assert rel_err(out, x.double() @ reference_rotation(layer, "a") @ w.T + b) <= 1e-5


CONV_GEOMETRIES = [
    # in, out, kernel, stride, padding, dilation, input H×W, block size
    (2, 3, (3, 3), 1, 0, 1, (7, 8), 6),
    (2, 3, (3, 3), 1, 1, 1, (6, 6), 3),
    (2, 4, (3, 2), (2, 1), (1, 2), (2, 1), (9, 8), 4),
    (3, 2, (2, 3), 2, 1, 2, (10, 11), 9),
    (4, 3, (1, 1), 1, 0, 1, (5, 4), 2),
    (1, 2, (5, 1), (1, 3), (2, 0), 1, (8, 9), 5),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("c_in", "c_out", "kernel", "stride", "padding", "dilation", "size", "block"), CONV_GEOMETRIES)
def test_conv2d_forward_and_merged_forward_equal_unfold_reference(
    c_in, c_out, kernel, stride, padding, dilation, size, block, bias: bool
) -> None:
    base = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    weight = base.weight.detach().clone()
    bias_value = None if base.bias is None else base.bias.detach().clone()
    layer = Conv2d(base, "a", r=0, oft_block_size=block)
    features = c_in * math.prod(base.kernel_size)
    set_random_packed(layer, "a", scale=0.5)
    x = torch.randn(2, c_in, *size)
    expected = conv2d_unfold_reference(base, weight, bias_value, x, reference_rotation(layer, "a", features))
    unmerged = layer(x)
    assert unmerged.shape == expected.shape
    assert rel_err(unmerged, expected) <= 1e-5
    layer.merge()
    assert rel_err(layer(x), expected) <= 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_merge_then_unmerge_restores_weights_even_after_ten_cycles(kind: str, mode: str) -> None:
    case = build(kind, **MODES[mode])
    set_random_packed(case.layer, "a", scale=0.3)  # Neumann: ‖Q‖₂ ≈ 0.7, so R_5 is visibly not orthogonal
    case.layer.merge()
    assert rel_err(case.weight(), case.original_weight) > 1e-3
    case.layer.unmerge()
    assert rel_err(case.weight(), case.original_weight) <= 1e-5
    for _ in range(10):
        case.layer.merge()
        case.layer.unmerge()
    assert rel_err(case.weight(), case.original_weight) <= 1e-5


# ------------------------------------------------------------------------------------ several adapters
@pytest.mark.parametrize("kind", KINDS)
def test_several_adapters_compose_in_the_same_order_in_forward_and_merge(kind: str) -> None:
    case = build(kind, block_size=3)
    case.layer.update_layer("b", r=0, oft_block_size=4)
    set_random_packed(case.layer, "a", scale=0.6, seed=1)
    set_random_packed(case.layer, "b", scale=0.6, seed=2)
    case.layer.set_adapter(["a", "b"])
    r_a, r_b = reference_rotation(case.layer, "a"), reference_rotation(case.layer, "b")
    assert rel_err(r_a @ r_b, r_b @ r_a) > 1e-2  # the order matters
    expected = case.reference([r_a, r_b])
    forward = case.layer(case.x)
    assert rel_err(forward, expected) <= 1e-5
    case.layer.merge()
    assert case.layer.merged_adapters == ["a", "b"]
    assert rel_err(case.layer(case.x), expected) <= 1e-5
    case.layer.unmerge()
    assert rel_err(case.weight(), case.original_weight) <= 1e-5


def test_linear_forward_with_active_a_b_is_x_rb_ra_wt_from_get_delta_weight() -> None:
    base = nn.Linear(D, 5)
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = Linear(base, "a", r=4)
    layer.update_layer("b", r=3)
    set_random_packed(layer, "a", scale=0.6, seed=1)
    set_random_packed(layer, "b", scale=0.6, seed=2)
    layer.set_adapter(["a", "b"])
    x = torch.randn(6, D)
    r_a, r_b = layer.get_delta_weight("a"), layer.get_delta_weight("b")
    assert rel_err(r_a, reference_rotation(layer, "a")) <= 1e-5
    assert rel_err(layer(x), x @ r_b @ r_a @ w.T + b) <= 1e-5


# ------------------------------------------------------------------------------------------- dropout
def _identity_base(features: int) -> nn.Linear:
    base = nn.Linear(features, features, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.eye(features))
    return base


def test_module_dropout_turns_exactly_floor_p_d_blocks_into_identity_in_training() -> None:
    features, block, p = 24, 4, 0.5  # 6 blocks, 3 dropped per call
    layer = Linear(_identity_base(features), "a", r=0, oft_block_size=block, module_dropout=p)
    set_random_packed(layer, "a", scale=0.5)
    rotation = reference_rotation(layer, "a", features)
    eye = torch.eye(block)
    layer.train()
    masks = set()
    for _ in range(10):
        dense = layer(torch.eye(features)).detach()  # x = I and W = I: the output is the rotation used
        blocks = [dense[i * block : (i + 1) * block, i * block : (i + 1) * block] for i in range(features // block)]
        assert torch.equal(dense, dense_block_diag(torch.stack(blocks)))  # still block-diagonal
        dropped = tuple(torch.equal(blk, eye) for blk in blocks)
        assert sum(dropped) == math.floor(p * features / block)
        for i, blk in enumerate(blocks):
            if not dropped[i]:
                assert rel_err(blk, rotation[i * block : (i + 1) * block, i * block : (i + 1) * block]) <= 1e-5
        masks.add(dropped)
    assert len(masks) > 1, "dropout chose the same blocks on every call"


def test_module_dropout_in_eval_equals_no_dropout_and_varies_in_training() -> None:
    base = nn.Linear(D, 5)
    with_dropout = Linear(base, "a", r=0, oft_block_size=3, module_dropout=0.5)
    without = Linear(copy.deepcopy(base), "a", r=0, oft_block_size=3)
    set_random_packed(with_dropout, "a", scale=0.5)
    set_random_packed(without, "a", scale=0.5)
    x = torch.randn(5, D)
    with_dropout.eval()
    assert torch.equal(with_dropout(x), without(x))
    with_dropout.train()
    outputs = [with_dropout(x).detach() for _ in range(5)]
    assert any(rel_err(out, without(x)) > 1e-3 for out in outputs)
    assert any(not torch.equal(outputs[0], out) for out in outputs[1:])


# ---------------------------------------------------------------------------------------------- COFT
@pytest.mark.parametrize("block_share", [False, True])
def test_coft_projects_each_generator_into_the_eps_ball(block_share: bool) -> None:
    eps = 0.05
    layer = Linear(nn.Linear(D, 5), "a", r=0, oft_block_size=4, coft=True, eps=eps, block_share=block_share)
    packed = set_random_packed(layer, "a", scale=1.0)
    radius = eps if block_share else eps / math.sqrt(3)
    norms = torch.linalg.matrix_norm(layer.oft_R["a"].generators().detach())
    assert (norms <= radius * (1 + 1e-5)).all() and (norms >= radius * (1 - 1e-5)).all()  # all were outside
    # The layer computes x R(Q · radius/‖Q‖_F) Wᵀ.
    q = skew_reference(packed.double(), 4)
    projected = q * (radius / torch.linalg.matrix_norm(q))[:, None, None]
    eye = torch.eye(4, dtype=torch.float64)
    rotation = dense_block_diag((eye + projected) @ torch.linalg.inv(eye - projected), 3)
    x = torch.randn(3, D)
    w, b = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    assert rel_err(layer(x), x.double() @ rotation @ w.T + b) <= 1e-5


def test_coft_leaves_generators_inside_the_ball_unchanged() -> None:
    layer = Linear(nn.Linear(D, 5), "a", r=0, oft_block_size=4, coft=True, eps=10.0)
    packed = set_random_packed(layer, "a", scale=0.1)
    assert torch.equal(layer.oft_R["a"].generators().detach(), skew_reference(packed, 4))


@pytest.mark.parametrize("mode", MODES)
def test_coft_output_equals_peft_and_our_parameter_is_not_written(mode: str) -> None:
    base = nn.Linear(D, 5)
    ours = Linear(base, "a", r=0, oft_block_size=4, coft=True, eps=0.05, **MODES[mode])
    theirs = peft_layer(peft_oft.Linear, copy.deepcopy(base), 4, coft=True, eps=0.05, **MODES[mode])
    packed = set_random_packed(ours, "a", scale=0.5)
    with torch.no_grad():  # peft's exact mode means R(-Q)
        peft_parameter(theirs).copy_(packed if mode == "neumann" else -packed)
    x = torch.randn(2, 3, D)
    assert rel_err(ours(x), theirs(x)) <= 1e-5
    assert torch.equal(ours.oft_R["a"].weight.detach(), packed)
    document_upstream_defect(
        not torch.equal(peft_parameter(theirs).detach().abs(), packed.abs()), "peft COFT writes into its parameter"
    )


# ------------------------------------------------------------------------------------- any base layer
class OpaqueLinear(nn.Module):
    """A linear layer that stores its weight in a form nobody else can read (think: a quantized kernel)."""

    def __init__(self, in_features: int, out_features: int, error: type[Exception]) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.packed_weight = nn.Parameter(torch.randn(out_features, in_features), requires_grad=False)
        self.error = error

    @property
    def weight(self) -> torch.Tensor:
        raise self.error("the weight of this layer cannot be read")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.packed_weight.T


@pytest.mark.parametrize("error", [AttributeError, RuntimeError])
def test_any_layer_with_in_out_features_runs_forward_backward_but_refuses_merge(error: type[Exception]) -> None:
    base = OpaqueLinear(D, 5, error)
    layer = Linear(base, "a", r=0, oft_block_size=4)
    set_random_packed(layer, "a", scale=0.5)
    x = torch.randn(3, D)
    out = layer(x)
    assert rel_err(out, x.double() @ reference_rotation(layer, "a") @ base.packed_weight.double().T) <= 1e-5
    out.square().sum().backward()
    assert layer.oft_R["a"].weight.grad is not None and layer.oft_R["a"].weight.grad.abs().sum() > 0
    with pytest.raises(NotImplementedError, match="merge"):
        layer.merge()
    assert not layer.merged and layer.merged_adapters == []


# ------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("kind", ["linear", "embedding", "conv2d"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layers_keep_fp32_parameters_and_save_no_fp32_activations(kind: str, dtype) -> None:
    if kind == "linear":
        base = nn.Linear(64, 32).to(dtype)
        x = torch.randn(4, 16, 64).to(dtype).requires_grad_()
        layer, activation_numel = Linear(base, "a", r=8), x.numel()
    elif kind == "embedding":
        base = nn.Embedding(50, 64).to(dtype)
        x = torch.randint(0, 50, (4, 16))
        layer, activation_numel = Embedding(base, "a", r=8), 4 * 16 * 64
    else:
        base = nn.Conv2d(4, 8, 2).to(dtype)
        x = torch.randn(2, 4, 12, 12).to(dtype).requires_grad_()
        layer, activation_numel = Conv2d(base, "a", r=2), x.numel()
    fp32_reference = copy.deepcopy(layer).float()
    set_random_packed(layer, "a", scale=0.3)
    set_random_packed(fp32_reference, "a", scale=0.3)
    assert layer.oft_R["a"].weight.dtype == torch.float32
    assert layer.oft_R["a"].rotation_blocks().dtype == torch.float32
    # Built in fp32 even when a user casts the adapter itself to half precision.
    assert copy.deepcopy(layer).to(dtype).oft_R["a"].rotation_blocks().dtype == torch.float32
    saved: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel() >= activation_numel:
            saved.append((tensor.dtype, tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x)
    assert out.dtype == dtype
    assert saved, "the check saw no activation-sized tensor; make the activations larger"
    assert [entry for entry in saved if entry[0] == torch.float32] == []
    out.float().square().sum().backward()
    grad = layer.oft_R["a"].weight.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0
    x_fp32 = x.float() if x.is_floating_point() else x
    assert rel_err(out, fp32_reference(x_fp32)) <= 3e-2


# ------------------------------------------------------------------------------------ against peft
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block_share", [False, True])
def test_linear_output_and_merged_weight_equal_peft(mode: str, block_share: bool) -> None:
    base = nn.Linear(16, 6)
    ours = Linear(base, "a", r=0, oft_block_size=4, block_share=block_share, **MODES[mode])
    theirs = peft_layer(peft_oft.Linear, copy.deepcopy(base), 4, block_share=block_share, **MODES[mode])
    packed = set_random_packed(ours, "a", scale=0.2)
    with torch.no_grad():
        peft_parameter(theirs).copy_(packed if mode == "neumann" else -packed)
    x = torch.randn(2, 5, 16)
    assert rel_err(ours(x), theirs(x)) <= 1e-5
    ours.merge()
    theirs.merge()
    assert rel_err(ours.base_layer.weight, theirs.base_layer.weight) <= 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_embedding_output_equals_peft(mode: str) -> None:
    base = nn.Embedding(20, 12)
    ours = Embedding(base, "a", r=0, oft_block_size=4, **MODES[mode])
    theirs = peft_layer(peft_oft.Embedding, copy.deepcopy(base), 4, **MODES[mode])
    packed = set_random_packed(ours, "a", scale=0.2)
    with torch.no_grad():
        peft_parameter(theirs).copy_(packed if mode == "neumann" else -packed)
    x = torch.randint(0, 20, (3, 7))
    assert rel_err(ours(x), theirs(x)) <= 1e-5


def test_conv2d_equals_peft_where_peft_is_right_kernel_sized_input_and_merged_weight() -> None:
    base = nn.Conv2d(2, 3, 3)
    ours = Conv2d(base, "a", r=0, oft_block_size=6, use_cayley_neumann=True)
    theirs = peft_layer(peft_oft.Conv2d, copy.deepcopy(base), 6, use_cayley_neumann=True)
    packed = set_random_packed(ours, "a", scale=0.15)
    with torch.no_grad():
        peft_parameter(theirs).copy_(packed)
    x = torch.randn(4, 2, 3, 3)  # one patch: peft's unfold/fold is exact here
    assert rel_err(ours(x), theirs(x)) <= 1e-5
    ours.merge()
    theirs.merge()
    assert rel_err(ours.base_layer.weight, theirs.base_layer.weight) <= 1e-5


# ------------------------------------------------------------------- peft defects we do not copy
def test_conv2d_forward_is_right_on_inputs_larger_than_the_kernel_where_peft_is_not() -> None:
    base = nn.Conv2d(2, 3, 3, padding=1)
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    ours = Conv2d(base, "a", r=0, oft_block_size=6)
    theirs = peft_layer(peft_oft.Conv2d, copy.deepcopy(base), 6, use_cayley_neumann=False)
    packed = set_random_packed(ours, "a", scale=0.3)
    with torch.no_grad():
        peft_parameter(theirs).copy_(-packed)
    x = torch.randn(2, 2, 6, 7)
    expected = conv2d_unfold_reference(base, weight, bias, x, reference_rotation(ours, "a", 18))
    assert rel_err(ours(x), expected) <= 1e-5
    peft_forward = theirs(x).detach()
    theirs.merge()
    document_upstream_defect(rel_err(peft_forward, theirs(x)) > 1e-2, "peft Conv2d forward ≠ its merged layer")


def test_module_dropout_is_applied_where_peft_ignores_it() -> None:
    base = nn.Linear(D, 5)
    ours = Linear(base, "a", r=0, oft_block_size=3, module_dropout=0.5)
    theirs = peft_layer(peft_oft.Linear, copy.deepcopy(base), 3, module_dropout=0.5, use_cayley_neumann=True)
    packed = set_random_packed(ours, "a", scale=0.5)
    with torch.no_grad():
        peft_parameter(theirs).copy_(packed)
    x = torch.randn(4, D)
    ours.eval()
    evaluation = ours(x).detach()
    ours.train()
    assert any(rel_err(ours(x), evaluation) > 1e-3 for _ in range(5))
    theirs.eval()
    peft_eval = theirs(x).detach()
    theirs.train()
    document_upstream_defect(
        all(torch.equal(theirs(x), peft_eval) for _ in range(5)), "peft ignores module_dropout in forward"
    )


def test_exact_and_neumann_modes_mean_the_same_rotation_where_peft_transposes() -> None:
    base = nn.Linear(D, 5)
    x = torch.randn(4, D)
    exact = Linear(base, "a", r=0, oft_block_size=4)
    packed = set_random_packed(exact, "a", scale=0.15)
    expected = exact(x).detach()
    differences = []
    for terms in (4, 6, 10, 20):
        neumann = Linear(copy.deepcopy(base), "a", r=0, oft_block_size=4, use_cayley_neumann=True,
                         num_cayley_neumann_terms=terms)  # fmt: skip
        set_random_packed(neumann, "a", scale=0.15)
        differences.append(rel_err(neumann(x), expected))
    assert all(later < earlier for earlier, later in zip(differences, differences[1:], strict=False))
    assert differences[-1] <= 1e-6

    peft_outputs = {}
    for mode in MODES:
        theirs = peft_layer(peft_oft.Linear, copy.deepcopy(base), 4, num_cayley_neumann_terms=20, **MODES[mode])
        with torch.no_grad():
            peft_parameter(theirs).copy_(packed)
        peft_outputs[mode] = theirs(x).detach()
    document_upstream_defect(
        rel_err(peft_outputs["exact"], peft_outputs["neumann"]) > 1e-2, "peft exact and Neumann modes transpose R"
    )


def test_several_adapters_agree_between_forward_and_merge_where_peft_reverses_them() -> None:
    base = nn.Linear(D, 5)
    ours = Linear(base, "a", r=0, oft_block_size=3)
    ours.update_layer("b", r=0, oft_block_size=4)
    theirs = peft_layer(peft_oft.Linear, copy.deepcopy(base), 3, name="a", use_cayley_neumann=False)
    theirs.update_layer("b", 0, config=OFTConfig(r=0, oft_block_size=4, use_cayley_neumann=False, target_modules=["x"]))
    for name, seed in (("a", 1), ("b", 2)):
        packed = set_random_packed(ours, name, scale=0.6, seed=seed)
        with torch.no_grad():
            peft_parameter(theirs, name).copy_(-packed)
    ours.set_adapter(["a", "b"])
    theirs.set_adapter(["a", "b"])
    x = torch.randn(4, D)
    forward = ours(x).detach()
    ours.merge()
    assert rel_err(ours(x), forward) <= 1e-5
    peft_forward = theirs(x).detach()
    theirs.merge()
    document_upstream_defect(rel_err(theirs(x), peft_forward) > 1e-2, "peft composes adapters differently in merge")


# --------------------------------------------------------------------------- training and bookkeeping
def _two_adapter_linear() -> tuple[Linear, torch.Tensor, torch.Tensor]:
    base = nn.Linear(D, 5)
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = Linear(base, "a", r=0, oft_block_size=4)
    layer.update_layer("b", r=0, oft_block_size=3)
    set_random_packed(layer, "a", scale=0.5, seed=1)
    set_random_packed(layer, "b", scale=0.5, seed=2)
    return layer, w, b


def test_backward_reaches_only_the_active_adapter() -> None:
    layer, _, _ = _two_adapter_linear()
    assert layer.active_adapters == ["a"]
    layer(torch.randn(3, D)).square().sum().backward()
    assert layer.oft_R["a"].weight.grad.abs().sum() > 0
    assert layer.oft_R["b"].weight.grad is None and not layer.oft_R["b"].weight.requires_grad


def test_base_layer_is_frozen_so_only_oft_parameters_get_gradients() -> None:
    layer, _, _ = _two_adapter_linear()
    layer(torch.randn(3, D)).square().sum().backward()
    with_grad = {name for name, p in layer.named_parameters() if p.grad is not None}
    assert with_grad == {"oft_R.a.weight"}


def test_set_adapter_switches_forward_and_trainability() -> None:
    layer, w, b = _two_adapter_linear()
    x = torch.randn(3, D)
    layer.set_adapter("b")
    assert layer.active_adapters == ["b"] and layer.active_adapter == "b"
    assert layer.oft_R["b"].weight.requires_grad and not layer.oft_R["a"].weight.requires_grad
    assert rel_err(layer(x), x.double() @ reference_rotation(layer, "b") @ w.double().T + b.double()) <= 1e-5
    layer.set_adapter(["a", "b"], inference_mode=True)
    assert not any(p.requires_grad for p in layer.oft_R.parameters())
    layer.set_adapter(["zzz", "b"])  # a name this layer does not hold is skipped, as in peft
    assert rel_err(layer(x), x.double() @ reference_rotation(layer, "b") @ w.double().T + b.double()) <= 1e-5


def test_delete_adapter_removes_it_everywhere_and_activates_a_remaining_one() -> None:
    layer, w, b = _two_adapter_linear()
    layer.delete_adapter("a")
    assert layer.adapter_names == ["b"] and layer.active_adapters == ["b"]
    assert "a" not in layer.r and "a" not in layer.oft_block_size and "a" not in layer.oft_dropout
    x = torch.randn(3, D)
    assert rel_err(layer(x), x.double() @ reference_rotation(layer, "b") @ w.double().T + b.double()) <= 1e-5
    with pytest.raises(ValueError, match="zzz"):
        layer.delete_adapter("zzz")


def test_delete_adapter_refuses_a_merged_adapter() -> None:
    layer, _, _ = _two_adapter_linear()
    layer.merge()
    with pytest.raises(ValueError, match="unmerge"):
        layer.delete_adapter("a")
    assert layer.adapter_names == ["a", "b"]


def test_disabling_adapters_gives_base_output_and_unmerges() -> None:
    layer, w, b = _two_adapter_linear()
    x = torch.randn(3, D)
    adapted = layer(x).detach()
    layer.merge()
    layer.enable_adapters(False)
    assert layer.disable_adapters and not layer.merged and layer.merged_adapters == []
    assert rel_err(layer.base_layer.weight, w) <= 1e-5
    torch.testing.assert_close(layer(x), x @ w.T + b, rtol=1e-5, atol=1e-6)
    layer.enable_adapters(True)
    assert not layer.disable_adapters and layer.oft_R["a"].weight.requires_grad
    assert rel_err(layer(x), adapted) <= 1e-5


def test_forward_while_disabled_unmerges_a_merged_layer() -> None:
    layer, w, b = _two_adapter_linear()
    layer.enable_adapters(False)
    layer.merge()
    assert layer.merged
    x = torch.randn(3, D)
    torch.testing.assert_close(layer(x), x @ w.T + b, rtol=1e-5, atol=1e-6)
    assert not layer.merged


def test_merge_bookkeeping() -> None:
    layer, w, _ = _two_adapter_linear()
    assert not layer.merged and layer.merged_adapters == []
    layer.merge(adapter_names=["b"])
    assert layer.merged and layer.merged_adapters == ["b"]
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge(adapter_names=["b", "a"])
    assert layer.merged_adapters == ["b", "a"]
    layer.unmerge()
    assert not layer.merged and layer.merged_adapters == []
    assert rel_err(layer.base_layer.weight, w) <= 1e-5
    with pytest.warns(UserWarning, match="Already unmerged"):
        layer.unmerge()
    with pytest.raises(ValueError, match="zzz"):
        layer.merge(adapter_names=["zzz"])


def test_safe_merge_refuses_non_finite_weights_and_writes_nothing() -> None:
    layer, w, _ = _two_adapter_linear()
    with torch.no_grad():
        layer.oft_R["a"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'a'"):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(layer.base_layer.weight, w)


# ----------------------------------------------------------------------------------- Neumann warning
def _neumann_layer(row_norm: float, **kwargs) -> Linear:
    layer = Linear(nn.Linear(D, 5), "a", r=0, oft_block_size=4, use_cayley_neumann=True, **kwargs)
    with torch.no_grad():
        weight = layer.oft_R["a"].weight
        weight.copy_(torch.randn(weight.shape))
        weight.mul_(0.1 / weight.norm(dim=-1, keepdim=True))
        weight[1] *= row_norm / 0.1
    return layer


def _neumann_warnings(fn: Callable[[], object]) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if "Neumann" in str(w.message)]


def test_neumann_mode_warns_once_when_a_block_nears_divergence() -> None:
    layer = _neumann_layer(0.95)
    x = torch.randn(2, D)
    with pytest.warns(UserWarning, match="Neumann"):
        layer(x)
    assert _neumann_warnings(lambda: layer(x)) == []
    assert _neumann_warnings(lambda: [layer(x) for _ in range(70)]) == []  # nor on any later periodic check


def test_neumann_mode_does_not_warn_for_small_generators() -> None:
    layer = _neumann_layer(0.5)
    assert _neumann_warnings(lambda: layer(torch.randn(2, D))) == []


def test_neumann_warning_judges_the_coft_projected_generator_that_is_used() -> None:
    # The stored parameter is never projected in place, so under COFT it may grow large while the rotation
    # stays within eps: that is no reason to warn about the series.
    layer = _neumann_layer(5.0, coft=True, eps=6e-5)
    assert (torch.linalg.matrix_norm(layer.oft_R["a"].generators().detach()) <= 6e-5).all()
    assert _neumann_warnings(lambda: layer(torch.randn(2, D))) == []


class _RowMajorOnlyLinear(nn.Linear):
    """A kernel that reads its input's memory as row-major whatever the strides say (as some quantized
    kernels do): it gives wrong results on any other layout, so the wrapper must hand it a contiguous input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.as_strided(x, (x.numel() // x.shape[-1], x.shape[-1]), (x.shape[-1], 1))
        return (rows @ self.weight.t() + self.bias).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("adapter", ["oft", "boft"])
def test_layers_that_assume_row_major_input_get_it_and_nn_linear_reads_the_rotated_layout_as_is(
    adapter: str,
) -> None:
    from orthotune import boft

    torch.manual_seed(0)
    plain, row_major_only = nn.Linear(64, 24), _RowMajorOnlyLinear(64, 24)
    row_major_only.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 64)

    def wrap(base: nn.Module) -> nn.Module:
        if adapter == "oft":
            return Linear(base, "default", r=0, oft_block_size=16, init_weights=False)
        return boft.Linear(base, "default", boft_block_size=8, boft_n_butterfly_factor=2, init_weights=False)

    expected = wrap(plain).eval()
    checked = wrap(row_major_only).eval()
    checked.load_state_dict(expected.state_dict())
    seen: list[torch.Tensor] = []
    expected.base_layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    reference = expected(x)
    assert not seen[0].is_contiguous()  # nn.Linear reads the rotated, column-major input: no copy was made
    assert rel_err(checked(x), reference) < 1e-6
