"""Block-structure rules (:mod:`orthotune.blocks`) against brute-force definitions and peft 0.21.2's layers.

The truths: the divisors of ``d`` listed by trial division; a butterfly's definition (``D = d / b`` blocks of
size ``b``, and ``m`` factors need ``b`` even and ``D`` divisible by ``2^(m-1)``, so that every factor pairs
half-blocks); peft's ``OFTLayer.adjust_oft_parameters``; and whether peft's own OFT and BOFT layers accept a
block size (peft's BOFT believing its CUDA extension is there, so it keeps every butterfly factor).
"""

from __future__ import annotations

import re
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from references import pretend_peft_boft_cuda
from torch import nn

from orthotune.blocks import (
    block_size_fits,
    divisors_near,
    max_butterfly_factors,
    nearest_divisor,
    resolve_boft_blocks,
    resolve_oft_blocks,
    valid_boft_block_sizes,
)

FEATURES = st.integers(1, 48)
FACTORS = st.integers(1, 4)


# ------------------------------------------------------------------------------------- brute-force truths
def divisors(d: int) -> list[int]:
    return [k for k in range(1, d + 1) if d % k == 0]


def nearest_divisor_brute(d: int, value: int) -> int:
    """The divisor of ``d`` at the least distance from ``value``; of two at the same distance, the lower."""
    best = None
    for k in divisors(d):
        if best is None or abs(k - value) < abs(best - value):
            best = k
    return best


def butterfly_fits(d: int, b: int, m: int) -> bool:
    """``D = d / b`` whole blocks; for ``m > 1`` factors each block splits in halves (``b`` even) and factor
    ``m - 1`` pairs blocks ``2^(m-1)`` apart, which needs ``D`` to be a multiple of ``2^(m-1)``."""
    if b < 1 or d % b:
        return False
    num_blocks = d // b
    return m == 1 or (b % 2 == 0 and num_blocks % 2 ** (m - 1) == 0)


def peft_oft_blocks(d: int, r: int, oft_block_size: int) -> tuple[int, int]:
    """``(r, b)`` that peft's OFT Linear settles on for ``d`` input features."""
    from peft import OFTConfig
    from peft.tuners.oft import layer as peft_oft

    config = OFTConfig(r=r, oft_block_size=oft_block_size, target_modules=["x"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = peft_oft.Linear(nn.Linear(d, 2), "default", config=config, r=r)
    return layer.r["default"], layer.oft_block_size["default"]


def peft_boft_accepts(d: int, block_size: int, block_num: int, m: int) -> tuple[int, int] | None:
    """``(b, D)`` of peft's BOFT Linear for ``d`` features, or None when peft refuses the arguments."""
    import peft.tuners.boft.layer as peft_boft
    from peft import BOFTConfig

    config = BOFTConfig(
        boft_block_size=block_size, boft_block_num=block_num, boft_n_butterfly_factor=m, boft_dropout=0.0
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        pretend_peft_boft_cuda(monkeypatch)
        try:
            layer = peft_boft.Linear(nn.Linear(d, 2), "default", config=config)
        except ValueError:
            return None
    return layer.boft_block_size["default"], layer.boft_block_num["default"]


# ------------------------------------------------------------------------------------------------- OFT
@settings(max_examples=60, deadline=None)
@given(d=FEATURES, value=st.integers(1, 100))
def test_nearest_divisor_is_the_closest_divisor_lower_on_ties_as_in_peft(d: int, value: int) -> None:
    from peft.tuners.oft.layer import OFTLayer

    expected = nearest_divisor_brute(d, value)
    assert nearest_divisor(d, value) == expected
    assert OFTLayer.adjust_oft_parameters(None, d, value) == expected


def test_nearest_divisor_breaks_a_tie_downwards() -> None:
    assert nearest_divisor_brute(12, 5) == 4  # 4 and 6 are both 1 away: the tie the rule is about
    assert nearest_divisor(12, 5) == 4


@settings(max_examples=25, deadline=None)
@given(d=FEATURES, value=st.integers(1, 60), by_count=st.booleans())
def test_resolve_oft_blocks_tiles_the_width_like_peft(d: int, value: int, by_count: bool) -> None:
    r, b = (value, 0) if by_count else (0, value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolved = resolve_oft_blocks(d, r, b)
    assert resolved[0] * resolved[1] == d
    adjusted = resolved[0] if by_count else resolved[1]
    assert adjusted == (value if d % value == 0 else nearest_divisor_brute(d, value))
    assert resolved == peft_oft_blocks(d, r, b)
    argument = "r" if by_count else "oft_block_size"
    messages = [str(warning.message) for warning in caught]
    if d % value:
        assert any(f"{argument}={value}" in message and str(adjusted) in message for message in messages)
    else:
        assert not messages


@settings(max_examples=25, deadline=None)
@given(d=FEATURES, value=st.integers(1, 60))
def test_divisors_near_are_the_nearest_divisors(d: int, value: int) -> None:
    near = divisors_near(d, value)
    assert near == sorted(near) and set(near) <= set(divisors(d))
    assert len(near) == min(4, len(divisors(d)))
    farthest = max(abs(k - value) for k in near)
    assert all(abs(k - value) >= farthest for k in set(divisors(d)) - set(near))


def test_resolve_oft_blocks_errors_name_the_arguments() -> None:
    with pytest.raises(ValueError, match=r"r=0 and oft_block_size=0"):
        resolve_oft_blocks(12, 0, 0)
    with pytest.raises(ValueError, match=r"r=3 and oft_block_size=5 give 15 features .* has 12"):
        resolve_oft_blocks(12, 3, 5)
    assert resolve_oft_blocks(12, 3, 4) == (3, 4)
    for argument, r, b, value in (("r", -1, 0, "-1"), ("oft_block_size", 0, 2.5, "2.5"), ("r", True, 0, "True")):
        with pytest.raises(ValueError, match=rf"{argument}={re.escape(value)} must be a non-negative integer"):
            resolve_oft_blocks(12, r, b)


# ------------------------------------------------------------------------------------------------ BOFT
@settings(max_examples=25, deadline=None)
@given(d=FEATURES, m=FACTORS)
def test_valid_boft_block_sizes_are_the_brute_force_ones(d: int, m: int) -> None:
    expected = [b for b in range(1, d + 1) if butterfly_fits(d, b, m)]
    assert valid_boft_block_sizes(d, m) == expected
    assert [b for b in range(1, d + 1) if block_size_fits(d, b, m)] == expected


@settings(max_examples=25, deadline=None)
@given(d=FEATURES, data=st.data())
def test_max_butterfly_factors_is_the_largest_that_fits(d: int, data: st.DataObject) -> None:
    b = data.draw(st.sampled_from(divisors(d)))
    expected = max(m for m in range(1, d.bit_length() + 2) if butterfly_fits(d, b, m))
    assert max_butterfly_factors(d, b) == expected


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 32), m=FACTORS, data=st.data())
def test_resolve_boft_blocks_accepts_exactly_what_fits_like_peft(d: int, m: int, data: st.DataObject) -> None:
    by_count = data.draw(st.booleans())
    value = data.draw(st.integers(1, d + 2))
    block_size, block_num = (0, value) if by_count else (value, 0)
    b = d // value if by_count else value
    fits = d % value == 0 and butterfly_fits(d, b, m)
    if fits:
        assert resolve_boft_blocks(d, block_size, block_num, m) == (b, d // b)
        assert peft_boft_accepts(d, block_size, block_num, m) == (b, d // b)
        return
    assert peft_boft_accepts(d, block_size, block_num, m) is None
    argument = "boft_block_num" if by_count else "boft_block_size"
    with pytest.raises(ValueError, match=rf"{argument}={value} does not fit {d} features") as error:
        resolve_boft_blocks(d, block_size, block_num, m)
    suggested = re.search(rf"use {argument} in \[([\d, ]*)\]", str(error.value))
    assert suggested, str(error.value)
    for number in (int(text) for text in suggested.group(1).split(",") if text.strip()):
        size = d // number if by_count else number
        assert d % number == 0 and butterfly_fits(d, size, m), (number, str(error.value))


def test_resolve_boft_blocks_errors_name_the_arguments() -> None:
    with pytest.raises(ValueError, match=r"boft_block_size=0 and boft_block_num=0"):
        resolve_boft_blocks(16, 0, 0, 1)
    with pytest.raises(ValueError, match=r"boft_block_size=4 and boft_block_num=3 give 12 features .* has 16"):
        resolve_boft_blocks(16, 4, 3, 1)
    assert resolve_boft_blocks(16, 4, 4, 2) == (4, 4)
    with pytest.raises(ValueError, match=r"boft_block_num=-2 must be a non-negative integer"):
        resolve_boft_blocks(16, 0, -2, 1)
    with pytest.raises(ValueError, match=r"boft_block_size=4 .* at most boft_n_butterfly_factor=3"):
        resolve_boft_blocks(16, 4, 0, 4)  # D = 4 blocks: factors 2^0, 2^1, 2^2 apart, not 2^3
