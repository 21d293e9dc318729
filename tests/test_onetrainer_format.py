"""OneTrainer's OFT files (:mod:`orthotune.formats.onetrainer`) against a reference transcribed from OneTrainer.

The reference restates, in our own words, what OneTrainer computes for one layer:
``modules/module/oft_utils.py``, class ``OFTRotationModule`` (``_pytorch_skew_symmetric``, ``_spectral_norm``,
``_cans_newton_schulz_iteration``, ``_cayley_batch``, ``forward``) in the version that writes the
``scaled_oft``/``clipped_oft``/``cans_oft`` markers (Koratahiu/OneTrainer at 05fa99e4c9ed, the same code in
BitcrushedHeart/OneTrainer at 1cc6f0968c23), and ``modules/module/LoRAModule.py``, ``OFTModule.forward`` (linear
layers rotate their input ``x ↦ x R``; Conv2d layers run with the flattened weight multiplied by ``R``). The
inference-side reading, ComfyUI-OFTv2's ``node/oftv2_loader.py`` (``OFTv2Adapter.calculate_weight``), merges the
same: ``W Rᵀ`` for linear layers, ``W R`` for Conv2d. Random OneTrainer-format state dicts are read by orthotune,
put into OFT layers, and their outputs and merged weights compared with the reference.

One difference is by design: OneTrainer estimates each block's spectral norm for ``clipped_oft`` by power
iteration from random vectors it does not save, while orthotune clips with the exact norm. The reference here runs
OneTrainer's power-iteration step to convergence; a clip that does not bind is exact in every reading.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from references import rel_err
from torch import nn

from orthotune import oft
from orthotune.formats import LayerAdapter, add_layer_adapter, onetrainer

TOLERANCE = 1e-5  # the Neumann series is the same polynomial; fp32 rounding only
CANS_TOLERANCE = 1e-5  # OneTrainer's Newton-Schulz iteration reaches the Cayley transform to its convergence


# ------------------------------------------------------------------------ reference (OneTrainer's OFT, one layer)
def onetrainer_skew(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """``_pytorch_skew_symmetric``: the packed values in the strict upper triangle (``triu_indices`` order), minus
    the transpose."""
    rows, cols = torch.triu_indices(block_size, block_size, 1)
    matrix = torch.zeros(vec.shape[0], block_size, block_size, dtype=vec.dtype)
    matrix[:, rows, cols] = vec
    return matrix - matrix.transpose(-2, -1)


def onetrainer_clip(skew: torch.Tensor, max_norm: float, iterations: int = 300) -> torch.Tensor:
    """``_spectral_norm`` + the clip in ``_cayley_batch``: ``Q · max_norm / max(σ, max_norm)``, with ``σ = uᵀQv``
    after power-iteration steps (``v ← Qᵀu/‖·‖``, ``u ← Qv/‖·‖``) — run here to convergence."""
    generator = torch.Generator().manual_seed(7)
    u = torch.randn(skew.shape[0], skew.shape[1], 1, generator=generator, dtype=skew.dtype)
    v = torch.randn(skew.shape[0], skew.shape[1], 1, generator=generator, dtype=skew.dtype)
    for _ in range(iterations):
        v = skew.mT @ u
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)
        u = skew @ v
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-8)
    sigma = torch.sum(u * (skew @ v), dim=1, keepdim=True)
    return skew * (max_norm / torch.clamp(sigma, min=max_norm))


def onetrainer_newton_schulz(g: torch.Tensor, steps: int) -> torch.Tensor:
    """``_cans_newton_schulz_iteration``: the polar factor of ``G`` by Chebyshev-optimised Newton-Schulz steps."""
    g_norm = g.abs().sum(dim=-1, keepdim=True).amax(dim=-2, keepdim=True).clamp_min(1e-7)
    x = g / g_norm
    lower, upper = (1.0 / g_norm).clamp(min=1e-5, max=0.9), 1.0
    for _ in range(steps):
        product = lower * upper
        e_sq = (lower**2 + product + upper**2) / 3.0
        k = 2.0 * e_sq**1.5
        low = product * (lower + upper)
        alpha = 6.0 / (k + low)
        x = alpha * e_sq * x + (-alpha / 3.0) * ((x @ x.mT) @ x)
        eps = (k - low) / (k + low)
        lower, upper = 1 - eps, 1 + eps
    return x


def onetrainer_rotation(weight: torch.Tensor, scaled: bool, clip: float | None, cans: bool) -> torch.Tensor:
    """``OFTRotationModule.forward`` up to the blocks: ``(r, b, b)`` rotations ``R`` of a stored ``oft_R.weight``."""
    block_size = int((1 + math.isqrt(1 + 8 * weight.shape[1])) // 2)
    effective = weight / (2 * math.sqrt(block_size - 1)) if scaled else weight
    skew = onetrainer_skew(effective, block_size)
    if clip is not None:
        skew = onetrainer_clip(skew, clip)
    eye = torch.eye(block_size).expand_as(skew)
    if cans:
        half = onetrainer_newton_schulz(eye + skew, steps=7)  # fp32: 7 steps
        return half @ half
    q2 = skew @ skew  # the 5-term series: I + 2Q + 2Q² + 2Q³ + Q⁴
    return eye + 2 * skew + 2 * q2 + 2 * (q2 @ skew) + q2 @ q2


def onetrainer_forward(module: nn.Module, rotation: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``OFTModule.forward``: linear layers rotate their input; Conv2d layers multiply the flattened weight by
    ``R`` and run the convolution with it. A shared block is repeated over the width."""
    weight = module.weight.detach()
    width = weight[0].numel()
    block_size = rotation.shape[-1]
    rank = width // block_size
    if rotation.shape[0] == 1:
        rotation = rotation.repeat(rank, 1, 1)
    if isinstance(module, nn.Linear):
        rotated = torch.einsum("...rk,rkc->...rc", x.reshape(*x.shape[:-1], rank, block_size), rotation)
        return F.linear(rotated.reshape(x.shape), weight, module.bias)
    rotated = torch.einsum("ork,rkc->orc", weight.reshape(weight.shape[0], rank, block_size), rotation)
    return F.conv2d(x, rotated.reshape(weight.shape), module.bias, module.stride, module.padding)


def onetrainer_merged_weight(module: nn.Module, rotation: torch.Tensor) -> torch.Tensor:
    """ComfyUI-OFTv2's merge: ``W_flat Rᵀ`` blockwise for a linear layer, ``W_flat R`` for Conv2d."""
    weight = module.weight.detach()
    rank = weight[0].numel() // rotation.shape[-1]
    if rotation.shape[0] == 1:
        rotation = rotation.repeat(rank, 1, 1)
    if isinstance(module, nn.Linear):
        rotation = rotation.transpose(-1, -2)
    grouped = weight.reshape(weight.shape[0], rank, rotation.shape[-1])
    return torch.einsum("ork,rkc->orc", grouped, rotation).reshape(weight.shape)


# ----------------------------------------------------------------------------------------------- helpers
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(12, 5)  # 3 blocks of 4
        self.to_k = nn.Linear(8, 3)  # one shared block of 4, twice
        self.to_v = nn.Linear(4, 2)  # one block of 4 covering the input
        self.proj_in = nn.Conv2d(8, 3, 1)  # 2 blocks of 4
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)  # 18 features: 3 blocks of 6
        self.conv2 = nn.Conv2d(2, 3, 3, padding=1)  # one shared block of 3, six times


LAYERS = {  # name: (stored blocks, block size, input shape)
    "to_q": (3, 4, (2, 5, 12)),
    "to_k": (1, 4, (3, 8)),
    "to_v": (1, 4, (3, 4)),
    "proj_in": (2, 4, (2, 8, 5, 3)),
    "conv1": (3, 6, (2, 2, 7, 6)),  # inputs larger than the kernel
    "conv2": (1, 3, (1, 2, 5, 5)),
}


def onetrainer_state_dict(
    scale: float, scaled: bool, clip: float | None, cans: bool, seed: int = 0, prefix: str = "lora_unet_"
) -> dict[str, torch.Tensor]:
    """A file as OneTrainer saves it (kohya-style names): ``oft_R.weight`` and the markers its
    ``OFTRotationModule`` registers as persistent buffers."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (blocks, block_size, _) in LAYERS.items():
        key = prefix + name
        state[f"{key}.oft_R.weight"] = torch.randn(blocks, block_size * (block_size - 1) // 2, generator=generator)
        state[f"{key}.oft_R.weight"] *= scale
        if scaled:
            state[f"{key}.oft_R.scaled_oft"] = torch.tensor(True)
        if clip is not None:
            state[f"{key}.oft_R.clipped_oft"] = torch.tensor(clip)
        if cans:
            state[f"{key}.oft_R.cans_oft"] = torch.tensor(True)
    return state


def orthotune_layer(base: nn.Module, adapter: LayerAdapter) -> oft.OFTLayer:
    cls = oft.Conv2d if isinstance(base, nn.Conv2d) else oft.Linear
    layer = cls(copy.deepcopy(base), "ot", r=0, oft_block_size=adapter.block_size)
    add_layer_adapter(layer, "ot", adapter)
    return layer


CASES = {  # id: (weight scale, scaled_oft, clipped_oft, cans_oft)
    "neumann": (0.1, False, None, False),
    "scaled": (0.8, True, None, False),
    "clip-not-binding": (0.1, False, 0.95, False),
    "clip-binding": (0.3, False, 0.2, False),
    "cans": (0.3, False, None, True),
    "scaled-clip-cans": (2.0, True, 0.3, True),
}


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", list(CASES))
def test_onetrainer_file_gives_onetrainer_outputs_and_merged_weights(case: str) -> None:
    scale, scaled, clip, cans = CASES[case]
    model = Tiny()
    modules = dict(model.named_modules())
    state = onetrainer_state_dict(scale, scaled, clip, cans)
    assert onetrainer.detect(state)
    adapters = onetrainer.read(state, list(modules))
    assert sorted(adapters) == sorted(LAYERS)
    tolerance = CANS_TOLERANCE if cans else TOLERANCE
    generator = torch.Generator().manual_seed(3)
    binding = []
    for name, (blocks, block_size, shape) in LAYERS.items():
        adapter = adapters[name]
        assert adapter.rotation_side == "input" and adapter.block_size == block_size
        assert adapter.block_share == (blocks == 1) and adapter.use_cayley_neumann == (not cans)
        weight = state[f"lora_unet_{name}.oft_R.weight"]
        if clip is not None:
            effective = weight / (2 * math.sqrt(block_size - 1)) if scaled else weight
            sigma = torch.linalg.matrix_norm(onetrainer_skew(effective.double(), block_size), ord=2)
            binding.append(bool((sigma > clip).any()))
        rotation = onetrainer_rotation(weight, scaled, clip, cans)
        layer = orthotune_layer(modules[name], adapter)
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = onetrainer_forward(modules[name], rotation, x)
            assert rel_err(layer(x), expected) <= tolerance, name
            layer.merge()
            assert rel_err(layer.base_layer.weight, onetrainer_merged_weight(modules[name], rotation)) <= tolerance
            assert rel_err(layer(x), expected) <= tolerance, name
    if clip is not None:  # the cases are what their names say
        assert any(binding) == (case != "clip-not-binding"), binding


def test_onetrainer_conv2d_rotation_is_transposed_relative_to_linear() -> None:
    """Without ``conv2d_transposed`` a Conv2d layer would get OneTrainer's linear-path rotation, which is not
    what OneTrainer computes there: the flag is needed, and it leaves linear layers alone."""
    model = Tiny()
    modules = dict(model.named_modules())
    state = onetrainer_state_dict(0.3, False, None, False)
    adapters = onetrainer.read(state, list(modules))
    generator = torch.Generator().manual_seed(4)
    for name in ("proj_in", "to_q"):
        adapter = adapters[name]
        rotation = onetrainer_rotation(state[f"lora_unet_{name}.oft_R.weight"], False, None, False)
        x = torch.randn(LAYERS[name][2], generator=generator)
        plain = dataclasses.replace(adapter, conv2d_transposed=False)
        with torch.no_grad():
            expected = onetrainer_forward(modules[name], rotation, x)
            error = rel_err(orthotune_layer(modules[name], plain)(x), expected)
        if name == "proj_in":
            assert error > 1e-2
        else:
            assert error <= TOLERANCE


@pytest.mark.parametrize(
    "prefix, root",
    [("lora_unet_", "unet"), ("lora_unet.", "unet"), ("unet.", None)],
    ids=["kohya-style", "internal-dotted", "module-path"],
)
def test_onetrainer_names(prefix: str, root: str | None) -> None:
    """kohya-style ``lora_unet_…``, OneTrainer's internal dotted ``lora_unet.…`` (both need the prefix placed under
    the pipeline's U-Net) and plain module paths (matched as they are)."""
    pipeline = nn.Module()
    pipeline.unet = Tiny()
    names = [name for name, _ in pipeline.named_modules()]
    state = onetrainer_state_dict(0.1, False, None, False, prefix=prefix)
    assert onetrainer.detect(state)
    if root is not None:
        with pytest.raises(ValueError, match="OneTrainer OFT layers match no module"):
            onetrainer.read(state, names)
    adapters = onetrainer.read(state, names, prefixes=None if root is None else {"lora_unet": root})
    assert sorted(adapters) == sorted(f"unet.{name}" for name in LAYERS)


def test_onetrainer_clip_that_binds_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    state = onetrainer_state_dict(0.3, False, 0.2, False)
    with caplog.at_level(logging.INFO, logger="orthotune.formats.onetrainer"):
        onetrainer.read(state, list(dict(Tiny().named_modules())))
    assert "read with the exact clip" in caplog.text


@pytest.mark.parametrize(
    "suffix, message",
    [
        (".oft_R.cans_exp", "matrix-exponential"),
        (".dora_scale", "DoRA-OFT"),
        (".dora_log_multiplier", "DoRA-OFT"),
        (".initial_norm", "DoRA-OFT"),
    ],
)
def test_onetrainer_refuses_variants_it_cannot_read(suffix: str, message: str) -> None:
    state = onetrainer_state_dict(0.1, False, None, False)
    state[f"lora_unet_to_q{suffix}"] = torch.ones(1)
    assert onetrainer.detect(state)  # recognised, so that reading names the reason
    with pytest.raises(ValueError, match=message):
        onetrainer.read(state, list(dict(Tiny().named_modules())))


def test_onetrainer_refuses_malformed_and_foreign_tensors() -> None:
    names = list(dict(Tiny().named_modules()))
    state = onetrainer_state_dict(0.1, False, None, False)
    unknown = {**state, "lora_unet_to_q.alpha": torch.tensor(1.0)}
    assert not onetrainer.detect(unknown)
    with pytest.raises(ValueError, match="not a OneTrainer OFT tensor"):
        onetrainer.read(unknown, names)
    with pytest.raises(ValueError, match="packed"):
        onetrainer.read({"lora_unet_to_q.oft_R.weight": torch.zeros(3, 5)}, names)
    marker_only = {**state, "lora_unet_to_v.oft_R.scaled_oft": torch.tensor(True)}
    del marker_only["lora_unet_to_v.oft_R.weight"]
    with pytest.raises(ValueError, match="no oft_R.weight"):
        onetrainer.read(marker_only, names)
    adapters = onetrainer.read(state, names)
    wrong = oft.Linear(nn.Linear(10, 2), "ot", r=0, oft_block_size=5)
    with pytest.raises(ValueError, match="shared block of 4 does not divide the layer's 10"):
        add_layer_adapter(wrong, "ot", adapters["to_k"])
    with pytest.raises(ValueError, match="give 12 features but the layer has 8"):
        add_layer_adapter(oft.Linear(nn.Linear(8, 2), "ot", r=2), "ot", adapters["to_q"])


@pytest.mark.filterwarnings("ignore:an OFT block has")  # the series far from converging: still the same polynomial
@settings(max_examples=25, deadline=None)
@given(
    block_size=st.integers(2, 6),
    stored_blocks=st.integers(1, 3),
    repeats=st.integers(1, 3),
    kernel=st.sampled_from([0, 1, 3]),
    scale=st.sampled_from([0.05, 0.5, 2.0]),
    scaled=st.booleans(),
    clip=st.sampled_from([None, 0.3, 0.95]),
    cans=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_onetrainer_reference_equals_ours_across_shapes(
    block_size: int,
    stored_blocks: int,
    repeats: int,
    kernel: int,
    scale: float,
    scaled: bool,
    clip: float | None,
    cans: bool,
    seed: int,
) -> None:
    """One layer across block sizes, block counts (one stored block: shared over ``repeats``), kernels (0: linear),
    generator scales and every combination of the markers. The series is OneTrainer's only where it converges
    (``‖Q‖₂ < 1``), as it is for the exact transform everywhere; far out, both sides compute the same polynomial."""
    generator = torch.Generator().manual_seed(seed)
    blocks = stored_blocks if stored_blocks > 1 else repeats
    width = blocks * block_size
    if kernel == 0:
        base: nn.Module = nn.Linear(width, 3)
        x = torch.randn(4, width, generator=generator)
    else:  # the rotated width is in_channels · kh · kw: pick in_channels to fit it
        assume(width % (kernel * kernel) == 0)
        base = nn.Conv2d(width // (kernel * kernel), 2, kernel, padding=kernel // 2)
        x = torch.randn(2, width // (kernel * kernel), 4, 5, generator=generator)
    weight = torch.randn(stored_blocks, block_size * (block_size - 1) // 2, generator=generator) * scale
    state = {"layer.oft_R.weight": weight}
    if scaled:
        state["layer.oft_R.scaled_oft"] = torch.tensor(True)
    if clip is not None:
        state["layer.oft_R.clipped_oft"] = torch.tensor(clip)
    if cans:
        state["layer.oft_R.cans_oft"] = torch.tensor(True)
    adapter = onetrainer.read(state, ["", "layer"])["layer"]
    layer = orthotune_layer(base, adapter)
    rotation = onetrainer_rotation(weight, scaled, clip, cans)
    with torch.no_grad():
        expected = onetrainer_forward(base, rotation, x)
        assert rel_err(layer(x), expected) <= (CANS_TOLERANCE if cans else 4 * TOLERANCE)


def test_from_file_reads_a_onetrainer_file_into_a_model_with_onetrainers_outputs(tmp_path) -> None:
    """The whole path: a OneTrainer file on disk, detected among every format and loaded by
    ``orthotune.from_file`` (each layer with its own block size), gives OneTrainer's forward."""
    from safetensors.torch import save_file

    import orthotune

    model = Tiny()
    originals = copy.deepcopy(model)
    state = onetrainer_state_dict(0.2, scaled=True, clip=None, cans=False)
    path = tmp_path / "onetrainer_oft.safetensors"
    save_file(state, str(path))
    adapted = orthotune.from_file(model, path)
    generator = torch.Generator().manual_seed(5)
    for name, (_, _, shape) in LAYERS.items():
        rotation = onetrainer_rotation(state[f"lora_unet_{name}.oft_R.weight"], True, None, False)
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = onetrainer_forward(originals.get_submodule(name), rotation, x)
            assert rel_err(adapted.get_base_model().get_submodule(name)(x), expected) <= TOLERANCE, name
