"""The inference rotation cache: built once per parameter version, never stale.

Truth: a freshly built layer holding the same parameters (its output is computed with nothing kept), and a
count of Cayley transforms (the call a cache saves). Every way a parameter changes in practice is tried: an
optimizer step, ``load_state_dict`` (``copy_``), ``nn.init``, a replaced ``Parameter``, ``.to()``, a
train/eval switch, a deleted and re-added adapter.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from references import rel_err
from torch import nn

from orthotune import boft, oft
from orthotune.adapter_layer import AdapterLayer, forward_per_adapter


@pytest.fixture
def cayley_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts Cayley transforms made by OFT and BOFT layers (both build them through ``rotation_at_strength``)."""
    calls = [0]

    def counting(original):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[0] += 1
            return original(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(oft, "rotation_at_strength", counting(oft.rotation_at_strength))
    monkeypatch.setattr(boft, "rotation_at_strength", counting(boft.rotation_at_strength))
    return calls


def _oft_layer(neumann: bool = False) -> oft.Linear:
    torch.manual_seed(0)
    layer = oft.Linear(nn.Linear(32, 16), "default", r=0, oft_block_size=8, use_cayley_neumann=neumann)
    with torch.no_grad():
        layer.oft_R["default"].weight.normal_(0, 0.05)
    return layer


def _boft_layer() -> boft.Linear:
    torch.manual_seed(0)
    return boft.Linear(
        nn.Linear(32, 16), "default", boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.0,
        init_weights=False,
    )  # fmt: skip


def _fresh_output(layer: AdapterLayer, x: torch.Tensor) -> torch.Tensor:
    """The output of a deep copy (which starts with an empty cache), in the same mode."""
    twin = copy.deepcopy(layer)
    assert len(twin._rotation_cache) == 0
    with torch.no_grad():
        return twin(x)


@pytest.mark.parametrize("make", [_oft_layer, lambda: _oft_layer(neumann=True), _boft_layer],
                         ids=["oft", "oft-neumann", "boft"])  # fmt: skip
def test_no_grad_builds_once_and_reuses(make, cayley_calls: list[int]) -> None:  # noqa: ANN001
    layer = make().eval()
    x = torch.randn(3, 32)
    with torch.no_grad():
        first = layer(x)
        built = cayley_calls[0]
        assert built == 1
        for _ in range(3):
            assert torch.equal(layer(x), first)
    assert cayley_calls[0] == built
    assert rel_err(first, _fresh_output(layer, x)) == 0


def test_eval_with_frozen_adapter_reuses_also_with_grad_enabled(cayley_calls: list[int]) -> None:
    layer = _oft_layer().eval()
    layer.requires_grad_(False)
    x = torch.randn(3, 32, requires_grad=True)
    layer(x).sum().backward()  # the input still gets its gradient through cached blocks
    layer(x)
    assert cayley_calls[0] == 1 and x.grad is not None


def test_training_never_uses_the_cache(cayley_calls: list[int]) -> None:
    layer = _oft_layer().train()
    x = torch.randn(3, 32)
    for _ in range(2):
        layer(x).square().sum().backward()
    assert cayley_calls[0] == 2
    assert layer.oft_R["default"].weight.grad is not None


def test_optimizer_step_rebuilds(cayley_calls: list[int]) -> None:
    layer = _oft_layer()
    x = torch.randn(3, 32)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.eval()
    with torch.no_grad():
        before = layer(x)
    layer.train()
    layer(x).square().sum().backward()
    optimizer.step()
    layer.eval()
    with torch.no_grad():
        after = layer(x)
    assert not torch.equal(before, after)
    assert rel_err(after, _fresh_output(layer, x)) == 0


@pytest.mark.parametrize("make", [_oft_layer, _boft_layer], ids=["oft", "boft"])
def test_loading_through_copy_rebuilds(make, cayley_calls: list[int]) -> None:  # noqa: ANN001
    layer = make().eval()
    other = make()
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    x = torch.randn(3, 32)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())  # copy_ into the same Parameter objects
        loaded = layer(x)
    assert cayley_calls[0] == 2
    assert rel_err(loaded, _fresh_output(other.eval(), x)) == 0


def test_in_place_init_replaced_parameter_and_device_move_rebuild() -> None:
    layer = _oft_layer().eval()
    rotation = layer.oft_R["default"]
    x = torch.randn(3, 32)
    with torch.no_grad():
        layer(x)
        nn.init.normal_(rotation.weight, std=0.02)  # in place: a new version
        assert rel_err(layer(x), _fresh_output(layer, x)) == 0
        rotation.weight = nn.Parameter(torch.randn_like(rotation.weight) * 0.02)  # a new object
        assert rel_err(layer(x), _fresh_output(layer, x)) == 0
        layer.to(torch.float64)  # new storage behind the same Parameter
        assert rel_err(layer(x.double()), _fresh_output(layer, x.double())) == 0
    assert layer._rotation_cache.builds == 4


def test_train_eval_switches_rebuild(cayley_calls: list[int]) -> None:
    layer = _oft_layer()
    x = torch.randn(3, 32)
    with torch.no_grad():
        layer.eval()
        layer(x)
        layer.train()
        layer(x)
        layer.eval()
        layer(x)
        layer(x)
    assert cayley_calls[0] == 3


def test_dropout_in_training_under_no_grad_stays_random() -> None:
    torch.manual_seed(0)
    layer = oft.Linear(nn.Linear(64, 8), "default", r=0, oft_block_size=8, module_dropout=0.5, init_weights=False)
    x = torch.randn(5, 64)
    with torch.no_grad():
        outputs = {tuple(layer.train()(x).flatten().tolist()) for _ in range(8)}
    assert len(outputs) > 1  # blocks are kept, dropout is drawn on top of them every call


def test_deleted_adapter_is_forgotten_and_a_new_one_of_that_name_is_built() -> None:
    layer = _oft_layer().eval()
    x = torch.randn(3, 32)
    with torch.no_grad():
        layer(x)
        assert len(layer._rotation_cache) == 1
        layer.update_layer("other", r=0, oft_block_size=4, init_weights=False)
        layer.set_adapter("other")
        layer.delete_adapter("default")
        layer(x)
        assert len(layer._rotation_cache) == 1
        layer.update_layer("default", r=0, oft_block_size=16, init_weights=False)
        layer.set_adapter("default")
        assert rel_err(layer(x), _fresh_output(layer, x)) == 0


def test_inference_mode_entries_are_not_used_where_autograd_needs_to_save_them() -> None:
    layer = _oft_layer().eval()
    layer.requires_grad_(False)
    x = torch.randn(3, 32)
    with torch.inference_mode():
        expected = layer(x)
    inputs = x.clone().requires_grad_(True)
    out = layer(inputs)  # would fail with "Inference tensors cannot be saved for backward" on the kept blocks
    out.sum().backward()
    assert rel_err(out, expected) <= 1e-6


def test_copies_and_pickles_start_empty() -> None:
    layer = _oft_layer().eval()
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert len(clone._rotation_cache) == 0
        with torch.no_grad():
            assert torch.equal(clone(x), expected)


def test_writes_through_data_need_an_explicit_clear() -> None:
    """Documented limit: autograd's version counter does not see ``.data`` writes; clear_rotation_cache does."""
    layer = _oft_layer().eval()
    x = torch.randn(3, 32)
    with torch.no_grad():
        stale = layer(x)
        layer.oft_R["default"].weight.data.mul_(2)
        assert torch.equal(layer(x), stale)
        layer.clear_rotation_cache()
        assert rel_err(layer(x), _fresh_output(layer, x)) == 0


# --------------------------------------------------------------------------------------------- mixed batch
def test_mixed_batch_equals_each_row_with_its_own_adapter() -> None:
    torch.manual_seed(0)
    layer = oft.Linear(nn.Linear(32, 16), "a", r=0, oft_block_size=8, init_weights=False)
    layer.update_layer("b", r=0, oft_block_size=4, init_weights=False)
    layer.eval()
    x = torch.randn(6, 3, 32)
    names = ["a", "b", "b", "__base__", "a", "b"]  # runs and scattered rows, and the base model
    with torch.no_grad():
        mixed = layer(x, adapter_names=names)
        expected = []
        for row, name in enumerate(names):
            if name == "__base__":
                expected.append(layer.base_layer(x[row : row + 1]))
            else:
                layer.set_adapter(name)
                expected.append(layer(x[row : row + 1]))
    assert rel_err(mixed, torch.cat(expected)) <= 1e-6


def test_forward_per_adapter_reads_runs_as_views_and_writes_each_row_once() -> None:
    x = torch.arange(6.0).view(6, 1)
    seen: dict[str, torch.Tensor] = {}

    def run(name: str, rows: torch.Tensor) -> torch.Tensor:
        seen[name] = rows
        return rows * {"a": 10, "b": 100, "c": 1000}[name]

    out = forward_per_adapter(x, ["a", "a", "b", "c", "c", "b"], run)
    assert out.flatten().tolist() == [0, 10, 200, 3000, 4000, 500]
    assert seen["a"].data_ptr() == x.data_ptr()  # consecutive rows: a view, not a copy
    assert seen["c"].data_ptr() == x[3:].data_ptr()
    # three samples of two rows each (beams): the names repeat per row, in sample-major order
    out = forward_per_adapter(x, ["b", "a", "b"], run)
    assert out.flatten().tolist() == [0, 100, 20, 30, 400, 500]


@pytest.mark.parametrize("rows_per_sample", [1, 3])
@pytest.mark.parametrize("beams", [1, 2])
def test_small_mixed_batch_in_one_product_equals_each_row_with_its_own_adapter(
    rows_per_sample: int, beams: int
) -> None:
    """Few rows, adapters of one block size (one shared): the one-product path; each sample by its adapter."""
    torch.manual_seed(0)
    layer = oft.Linear(nn.Linear(32, 16), "a", r=0, oft_block_size=8, init_weights=False)
    layer.update_layer("b", r=0, oft_block_size=8, block_share=True, init_weights=False)
    layer.update_layer("c", r=0, oft_block_size=8, init_weights=False)
    layer.eval()
    names = ["a", "b", "__base__", "c"][: 4 // beams]
    x = torch.randn(len(names) * beams, rows_per_sample, 32)
    calls: list[int] = []
    original = oft.rotate_samples
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(oft, "rotate_samples", lambda *a: calls.append(1) or original(*a))
        mixed = layer(x, adapter_names=names)
        assert calls, "the one-product path was not taken"
        expected = []
        for row in range(x.shape[0]):
            name = names[row // beams]
            if name == "__base__":
                expected.append(layer.base_layer(x[row : row + 1]))
            else:
                layer.set_adapter(name)
                expected.append(layer(x[row : row + 1]))
    assert rel_err(mixed, torch.cat(expected)) <= 1e-6


def test_rotate_samples_equals_a_dense_product_per_sample() -> None:
    from orthotune.functional import rotate_samples

    torch.manual_seed(0)
    x = torch.randn(3, 2, 12, dtype=torch.float64)
    blocks = [torch.randn(3, 4, 4, dtype=torch.float64) for _ in range(3)]
    out = rotate_samples(x, blocks)
    for i in range(3):
        assert rel_err(out[i], x[i] @ torch.block_diag(*blocks[i].unbind(0))) <= 1e-12
    one_row = rotate_samples(x[:, :1], blocks)
    assert rel_err(one_row, out[:, :1]) <= 1e-12
    half = rotate_samples(x.float().to(torch.bfloat16), [b.float() for b in blocks])
    assert half.dtype == torch.bfloat16 and rel_err(half, out) <= 2**-7
    with pytest.raises(ValueError, match="one \\(D, b, b\\) rotation per sample"):
        rotate_samples(x, blocks[:2])


@pytest.mark.parametrize("make", [_oft_layer, _boft_layer], ids=["oft", "boft"])
def test_set_scale_rebuilds(make, cayley_calls: list[int]) -> None:  # noqa: ANN001
    """A strength is part of what the kept rotation depends on: after ``set_scale`` the layer gives what a fresh
    copy at that strength gives, and going back to the old strength rebuilds once more."""
    layer = make().eval()
    x = torch.randn(3, 32)
    with torch.no_grad():
        at_one = layer(x)
        layer.set_scale("default", 0.5)
        at_half = layer(x)
    assert cayley_calls[0] == 2
    assert not torch.equal(at_half, at_one)
    torch.testing.assert_close(at_half, _fresh_output(layer, x), rtol=0, atol=0)
    with torch.no_grad():
        layer.set_scale("default", 1.0)
        assert torch.equal(layer(x), at_one)
    assert cayley_calls[0] == 4  # the fresh copy built once too


def test_load_adapter_rebuilds(tmp_path) -> None:  # noqa: ANN001
    """``load_adapter`` into an existing adapter (peft's way of refreshing weights) invalidates the kept rotation."""
    from tiny_models import tiny_llama, token_batch

    import orthotune

    config = orthotune.OFTConfig(oft_block_size=8, target_modules=["q_proj"], init_weights=False)
    trained = orthotune.get_peft_model(tiny_llama(), config)
    trained.save_pretrained(tmp_path)
    model = orthotune.get_peft_model(tiny_llama(), orthotune.OFTConfig(oft_block_size=8, target_modules=["q_proj"]))
    model.eval()
    tokens = token_batch()
    with torch.no_grad():
        before = model(tokens).logits  # identity adapter, now kept
        model.load_adapter(tmp_path, "default")
        after = model(tokens).logits
        expected = trained.eval()(tokens).logits
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)
