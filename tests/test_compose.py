"""Composing adapters: ``cayley_inverse`` and ``OrthoModel.add_weighted_adapter``.

Truths: the textbook Cayley transform (``references.cayley_reference``) for the inverse map; the stacked model
``set_adapter([...])`` with ``set_scale`` for the composed adapter; the same sources in exact mode for
Cayley-Neumann sources; peft 0.21.2 loading the saved composed adapter.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from references import cayley_reference, rel_err, skew_reference
from tiny_models import tiny_bert, tiny_llama, token_batch
from torch import nn

import orthotune
from orthotune.functional import cayley_exact, cayley_inverse, composed_generator, packed_size, skew_part

FAST = settings(max_examples=25, deadline=None)


# ------------------------------------------------------------------------------------------- functional
@FAST
@given(
    size=st.integers(2, 10),
    scale=st.sampled_from([1e-3, 0.3, 3.0, 20.0]),
    seed=st.integers(0, 2**20),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_cayley_inverse_inverts_cayley_exact(size: int, scale: float, seed: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(seed)
    q = skew_reference(torch.randn(2, packed_size(size), generator=generator, dtype=torch.float64) * scale, size)
    recovered = cayley_inverse(cayley_reference(q).to(dtype))
    assert recovered.dtype == dtype
    # The generator's sensitivity to R grows like (1 + ‖Q‖²): compare the rotations it makes, and Q where tame.
    assert rel_err(cayley_reference(recovered.double()), cayley_reference(q)) < (
        1e-5 if dtype == torch.float32 else 1e-10
    )
    if scale <= 0.3:
        assert rel_err(recovered, q) < (1e-5 if dtype == torch.float32 else 1e-10)
    assert rel_err(skew_part(recovered.double()), recovered.double()) < (1e-5 if dtype == torch.float32 else 1e-9)


def test_cayley_inverse_refuses_a_half_turn() -> None:
    half_turn = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))  # 180° in the (0, 1) plane
    with pytest.raises(ValueError, match="eigenvalue at -1.*180°"):
        cayley_inverse(torch.stack([torch.eye(3, dtype=torch.float64), half_turn]))


def test_composed_generator_of_a_product() -> None:
    generator = torch.Generator().manual_seed(0)
    q1, q2, q3 = (skew_reference(torch.randn(4, 6, generator=generator, dtype=torch.float64), 4) for _ in range(3))
    rotations = [cayley_reference(q) for q in (q1, q2, q3)]
    composed = composed_generator(rotations)
    assert rel_err(cayley_exact(composed), rotations[0] @ rotations[1] @ rotations[2]) < 1e-10
    with pytest.raises(ValueError, match="different shapes"):
        composed_generator([rotations[0], rotations[1][:2]])


# ----------------------------------------------------------------------------------------------- model
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4))


def _stacked_output(model: orthotune.OrthoModel, adapters: list[str], weights: list[float], x: torch.Tensor):
    """The stacked model: every source active at weight × its own strength (set_scale), then restored."""
    for name, weight in zip(adapters, weights, strict=True):
        model.set_scale(name, weight)
    model.set_adapter(adapters)
    with torch.no_grad():
        output = model(x)
    for name in adapters:
        model.set_scale(name, 1.0)
    return output


def _oft(**options) -> orthotune.OFTConfig:
    defaults = {"r": 0, "oft_block_size": 4, "target_modules": ["0", "2"], "init_weights": False}
    return orthotune.OFTConfig(**{"use_cayley_neumann": False, **defaults, **options})


@pytest.mark.parametrize(
    ("configs", "weights"),
    [
        ([_oft(), _oft()], [1.0, 1.0]),
        ([_oft(), _oft(), _oft()], [0.7, -1.3, 2.0]),
        ([_oft(block_share=True), _oft()], [1.0, 0.5]),  # a shared block composed with separate ones
        ([_oft(block_share=True), _oft(block_share=True)], [1.5, 1.0]),
        ([_oft(coft=True, eps=0.5), _oft()], [1.0, -0.5]),
        ([_oft(target_modules=["0"]), _oft()], [1.0, 1.0]),  # adapters of different layers
        ([_oft()], [0.25]),  # one adapter at another strength
    ],
)
def test_composed_oft_adapter_equals_the_stacked_adapters(configs, weights) -> None:
    model = orthotune.get_peft_model(_mlp(), configs[0], adapter_name="s0")
    for i, config in enumerate(configs[1:], 1):
        model.add_adapter(f"s{i}", config)
    names = [f"s{i}" for i in range(len(configs))]
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    expected = _stacked_output(model, names, weights, x)
    model.add_weighted_adapter(names, weights, "composed")
    assert model.active_adapters == names  # not activated
    model.set_adapter("composed")
    with torch.no_grad():
        assert rel_err(model(x), expected) < 1e-5
    config = model.peft_config["composed"]
    assert not config.coft and not config.use_cayley_neumann
    assert config.block_share == all(c.block_share for c in configs)
    layer = model.base_model.model[0]
    assert layer.scaling["composed"] == 1.0


def test_weights_multiply_the_current_strength_and_order_matters() -> None:
    model = orthotune.get_peft_model(_mlp(), _oft(), adapter_name="a")
    model.add_adapter("b", _oft())
    x = torch.randn(5, 12)
    expected = _stacked_output(model, ["a", "b"], [1.5, 1.0], x)
    model.set_scale("a", 2.0)  # a's own strength is part of what is composed: 0.75 × 2 = 1.5
    model.add_weighted_adapter(["a", "b"], [0.75, 1.0], "ab")
    model.set_scale("a", 1.0)
    model.add_weighted_adapter(["b", "a"], [1.0, 1.0], "ba")
    model.set_adapter("ab")
    with torch.no_grad():
        assert rel_err(model(x), expected) < 1e-5
        ab = model(x)
        model.set_adapter("ba")
        assert (model(x) - ab).abs().max() > 1e-3  # rotations do not commute


def test_neumann_sources_compose_to_their_exact_rotations() -> None:
    """The new adapter is exact: it equals the sources in exact mode; the stacked Neumann model is off from it by
    no more than the series' truncation error."""
    neumann = orthotune.get_peft_model(_mlp(), _oft(use_cayley_neumann=True, num_cayley_neumann_terms=5), "a")
    neumann.add_adapter("b", _oft(use_cayley_neumann=True, num_cayley_neumann_terms=5))
    exact = orthotune.get_peft_model(_mlp(), _oft(), "a")
    exact.add_adapter("b", _oft())
    exact.load_state_dict(neumann.state_dict())  # the same parameters
    x = torch.randn(5, 12)
    reference = _stacked_output(exact, ["a", "b"], [1.0, -0.5], x)
    approximate = _stacked_output(neumann, ["a", "b"], [1.0, -0.5], x)
    neumann.add_weighted_adapter(["a", "b"], [1.0, -0.5], "ab")
    neumann.set_adapter("ab")
    with torch.no_grad():
        composed = neumann(x)
    assert rel_err(composed, reference) < 1e-5
    assert 1e-7 < rel_err(composed, approximate) < 1e-2  # the series' error, not a bug in composing


def test_composed_boft_one_factor_equals_stacked_and_multiplies_scales() -> None:
    config = orthotune.BOFTConfig(boft_block_size=4, target_modules=["0", "2"], init_weights=False, boft_dropout=0.0)
    model = orthotune.get_peft_model(_mlp(), config, adapter_name="a")
    model.add_adapter("b", config)
    x = torch.randn(5, 12)
    expected = _stacked_output(model, ["a", "b"], [0.5, 1.5], x)
    model.add_weighted_adapter(["a", "b"], [0.5, 1.5], "ab")
    model.set_adapter("ab")
    with torch.no_grad():
        assert rel_err(model(x), expected) < 1e-5
    layer = model.base_model.model[0]
    assert rel_err(layer.boft_s["ab"], layer.boft_s["a"] ** 0.5 * layer.boft_s["b"] ** 1.5) < 1e-6


def test_boft_with_several_factors_composes_only_one_adapter() -> None:
    config = orthotune.BOFTConfig(
        boft_block_size=2, boft_n_butterfly_factor=2, target_modules=["0", "2"], init_weights=False, boft_dropout=0.0
    )
    model = orthotune.get_peft_model(_mlp(), config, adapter_name="a")
    model.add_adapter("b", config)
    x = torch.randn(5, 12)
    expected = _stacked_output(model, ["a"], [-0.75], x)
    model.add_weighted_adapter(["a"], [-0.75], "a_back")  # factor by factor: exact
    model.set_adapter("a_back")
    with torch.no_grad():
        assert rel_err(model(x), expected) < 1e-5
    with pytest.raises(ValueError, match="boft_n_butterfly_factor=2.*not a single butterfly product"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab")
    assert "ab" not in model.peft_config


def test_what_differs_is_named_and_nothing_is_added() -> None:
    model = orthotune.get_peft_model(_mlp(), _oft(), adapter_name="a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("b", _oft(oft_block_size=2))
    with pytest.raises(ValueError, match=r"layer '0'.*block sizes \{'a': 4, 'b': 2\}"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab")
    with pytest.raises(ValueError, match="weights has 1 entries for 2 adapters"):
        model.add_weighted_adapter(["a", "b"], [1.0], "ab")
    with pytest.raises(ValueError, match="not a finite number"):
        model.add_weighted_adapter(["a"], [float("nan")], "ab")
    with pytest.raises(ValueError, match="list some of this model's adapters"):
        model.add_weighted_adapter(["a", "missing"], [1.0, 1.0], "ab")
    with pytest.raises(ValueError, match="already exists"):
        model.add_weighted_adapter(["a"], [1.0], "b")
    assert list(model.peft_config) == ["a", "b"]
    assert all("ab" not in layer.adapter_names for _, layer in model.adapter_layers())


def test_composed_adapter_on_a_transformer_saves_and_loads_in_peft(tmp_path) -> None:
    """A Llama with q/v and an embedding adapted twice: the composed adapter equals the stacked pair, keeps the
    first source's trained head copy, and peft 0.21.2 loads the saved file to the same outputs."""
    from peft import PeftModel

    config = orthotune.OFTConfig(
        oft_block_size=8,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        init_weights=False,
        use_cayley_neumann=False,
    )
    model = orthotune.get_peft_model(tiny_llama(), config, adapter_name="a")
    model.add_adapter("b", config)
    tokens = token_batch()
    for _, layer in model.adapter_layers():  # make the rotations large enough to matter
        with torch.no_grad():
            layer.oft_R["b"].weight.mul_(3.0)
    model.eval()
    expected = _stacked_output(model, ["a", "b"], [1.0, 0.5], tokens).logits
    model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "ab")
    model.set_adapter("ab")
    with torch.no_grad():
        assert rel_err(model(tokens).logits, expected) < 1e-5
    model.save_pretrained(tmp_path, selected_adapters=["ab"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ab").eval()
    with torch.no_grad():
        assert rel_err(loaded(tokens).logits, expected) < 1e-5


def test_modules_to_save_copy_comes_from_the_source_that_has_one() -> None:
    with_head = orthotune.OFTConfig(
        oft_block_size=8,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        init_weights=False,
        use_cayley_neumann=False,
    )
    without_head = orthotune.OFTConfig(
        oft_block_size=8, target_modules=["query", "value"], init_weights=False, use_cayley_neumann=False
    )
    model = orthotune.get_peft_model(tiny_bert(), without_head, adapter_name="a")
    model.add_adapter("b", with_head)
    wrapper = model.base_model.model.classifier
    with torch.no_grad():
        wrapper.modules_to_save["b"].weight.add_(-1.0)
    tokens = token_batch()
    expected = _stacked_output(model, ["a", "b"], [1.0, 1.0], tokens).logits
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab")
    model.set_adapter("ab")
    with torch.no_grad():
        assert rel_err(model(tokens).logits, expected) < 1e-5
    assert torch.equal(wrapper.modules_to_save["ab"].weight, wrapper.modules_to_save["b"].weight)


def test_two_sources_with_their_own_modules_to_save_copy_are_refused_like_set_adapter() -> None:
    config = orthotune.OFTConfig(oft_block_size=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = orthotune.get_peft_model(tiny_bert(), config, adapter_name="a")
    model.add_adapter("b", config)
    with pytest.raises(ValueError, match="only one copy can be used"):
        model.set_adapter(["b", "a"])
    with pytest.raises(ValueError, match="each have their own trained copy.*'classifier'"):
        model.add_weighted_adapter(["b", "a"], [1.0, 1.0], "ba")
    assert "ba" not in model.peft_config
