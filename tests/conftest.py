"""Fixtures and hooks for the whole suite; the helpers the test files share are in ``references.py``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings
from references import pretend_peft_boft_cuda

# Reproducible property tests: the same examples on every run and every machine. Per-test
# ``@settings(max_examples=..., deadline=None)`` inherit this profile's other values.
settings.register_profile("orthotune", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("orthotune")


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    """Every test starts from the same global RNG state, and runs torch on one intra-op thread.

    Test tensors are tiny: on a busy 2-core machine each op of a 2-thread pool waits ~16 ms at its barrier
    (measured: a 24×24 matmul, 16 ms with 2 threads, 7 µs with 1), which made this suite ~6× slower.
    """
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def peft_boft_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """peft silently forces boft_n_butterfly_factor=1 without its CUDA extension; give it a CPU block_diag."""
    pytest.importorskip("peft.tuners.boft.layer")
    pretend_peft_boft_cuda(monkeypatch)
