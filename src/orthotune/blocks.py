"""Block structure rules: which block sizes and counts fit a layer's width, for every method.

A rotation of ``d`` features is made of ``D`` blocks of size ``b`` with ``D · b = d``. OFT needs only that
``b`` divides ``d``; BOFT with ``m`` butterfly factors also needs an even ``b`` (for ``m > 1``) and
``d`` divisible by ``b · 2^(m-1)``. Layers resolve their arguments here, and the command line asks the same
functions before it builds anything.
"""

from __future__ import annotations

import warnings

__all__ = [
    "block_size_fits",
    "divisors_near",
    "max_butterfly_factors",
    "nearest_divisor",
    "resolve_boft_blocks",
    "resolve_oft_blocks",
    "valid_boft_block_sizes",
]


def _divisors(features: int) -> list[int]:
    return [k for k in range(1, features + 1) if features % k == 0]


def nearest_divisor(features: int, value: int) -> int:
    """The divisor of ``features`` closest to ``value``, the lower one on a tie (peft's rule)."""
    if value >= features:
        return features
    return min(_divisors(features), key=lambda k: (abs(k - value), k))


def divisors_near(features: int, value: int, count: int = 4) -> list[int]:
    """The ``count`` divisors of ``features`` nearest to ``value``, ascending (for error messages)."""
    return sorted(sorted(_divisors(features), key=lambda k: (abs(k - value), k))[:count])


def block_size_fits(features: int, block_size: int, num_factors: int = 1, rotation_side: str = "input") -> bool:
    """Whether blocks of ``block_size`` tile ``features`` for ``num_factors`` butterfly factors (1: OFT).

    On the output side (LyCORIS's butterfly) every factor, the first too, interleaves halves of blocks, so the
    block size is even even for one factor.
    """
    if block_size < 1 or features % block_size:
        return False
    if num_factors == 1 and rotation_side != "output":
        return True
    return block_size % 2 == 0 and features % (block_size * 2 ** (num_factors - 1)) == 0


def valid_boft_block_sizes(features: int, num_factors: int, rotation_side: str = "input") -> list[int]:
    """Block sizes that work for ``features`` and ``num_factors`` butterfly factors on ``rotation_side``."""
    return [b for b in range(1, features + 1) if block_size_fits(features, b, num_factors, rotation_side)]


def max_butterfly_factors(features: int, block_size: int, rotation_side: str = "input") -> int:
    """The most butterfly factors that blocks of ``block_size`` allow on ``features``."""
    factors = 1
    while block_size_fits(features, block_size, factors + 1, rotation_side):
        factors += 1
    return factors


def _check_counts(*arguments: tuple[str, object]) -> None:
    for argument, value in arguments:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{argument}={value!r} must be a non-negative integer; set it to 0 to derive it")


def resolve_oft_blocks(features: int, r: int, oft_block_size: int, stacklevel: int = 2) -> tuple[int, int]:
    """``(r, b)`` for an OFT layer of ``features`` from its arguments, exactly one of which is non-zero.

    A value that does not divide ``features`` moves to the nearest divisor with a warning (peft's rule).
    """
    _check_counts(("r", r), ("oft_block_size", oft_block_size))
    if r == 0 and oft_block_size == 0:
        raise ValueError(
            f"r=0 and oft_block_size=0: set exactly one of them (the number of blocks or their size), "
            f"e.g. oft_block_size={nearest_divisor(features, 32)} for {features} features"
        )
    if r and oft_block_size:
        if r * oft_block_size != features:
            raise ValueError(
                f"r={r} and oft_block_size={oft_block_size} give {r * oft_block_size} features but the layer "
                f"has {features}; set one of them to 0 so the other decides"
            )
        return r, oft_block_size
    argument, value = ("r", r) if r else ("oft_block_size", oft_block_size)
    if features % value:
        adjusted = nearest_divisor(features, value)
        warnings.warn(
            f"{argument}={value} does not divide the layer's {features} features; adjusted {argument} to "
            f"{adjusted} (nearby divisors: {divisors_near(features, value)})",
            stacklevel=stacklevel + 1,
        )
        value = adjusted
    return (value, features // value) if r else (features // value, value)


def resolve_boft_blocks(
    features: int, block_size: int, block_num: int, num_factors: int, rotation_side: str = "input"
) -> tuple[int, int]:
    """``(b, D)`` for a BOFT layer of ``features``, or a ``ValueError`` that lists values that fit."""
    _check_counts(("boft_block_size", block_size), ("boft_block_num", block_num))
    if block_size == 0 and block_num == 0:
        raise ValueError("boft_block_size=0 and boft_block_num=0: set exactly one of them, e.g. boft_block_size=8")
    if block_size and block_num and block_size * block_num != features:
        raise ValueError(
            f"boft_block_size={block_size} and boft_block_num={block_num} give {block_size * block_num} features "
            f"but the layer has {features}; set one of them to 0 so the other decides"
        )
    argument, value = ("boft_block_size", block_size) if block_size else ("boft_block_num", block_num)
    if features % value == 0:
        block_size = block_size or features // block_num
        if block_size_fits(features, block_size, num_factors, rotation_side):
            return block_size, features // block_size
    sizes = valid_boft_block_sizes(features, num_factors, rotation_side)
    if argument == "boft_block_num":
        hint = f"boft_block_num in {[features // b for b in sizes][::-1][:12]}"
    else:
        hint = f"boft_block_size in {sizes[:12]}"
    at_most = (
        ""
        if features % value
        else " (with this block size at most "
        f"boft_n_butterfly_factor={max_butterfly_factors(features, block_size, rotation_side)})"
    )
    even = "every block size must be even on the output side (LyCORIS); " if rotation_side == "output" else ""
    raise ValueError(
        f"{argument}={value} does not fit {features} features with boft_n_butterfly_factor={num_factors}: "
        f"{even}each factor needs an even block size and features divisible by block_size·2^(factors-1); "
        f"use {hint}{at_most}"
    )
