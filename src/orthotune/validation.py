"""Argument rules, each defined once: configs, layers and the command line all call these.

Every check raises a ``ValueError`` that names the argument, the value it got and what to pass instead. The
block-structure rules (which block sizes fit a layer's width) live in :mod:`orthotune.blocks`; the Cayley-
Neumann series' own minimum (2 terms) with the series, in :mod:`orthotune.functional.cayley`. This module
imports nothing heavy: the command line checks its arguments here before torch is loaded.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MIN_PEFT_NEUMANN_TERMS",
    "check_bias",
    "check_bool",
    "check_coft_eps",
    "check_exactly_one",
    "check_init_weights",
    "check_int",
    "check_peft_neumann_terms",
    "check_constraint",
    "check_probability",
    "check_rotation_side",
    "ROTATION_SIDES",
]

#: The fewest Cayley-Neumann terms an adapter *file* may use: with fewer, peft's series is another polynomial
#: than the truncation (its 3-term series is the 4-term truncation), so the file would mean different rotations
#: in the two libraries.
MIN_PEFT_NEUMANN_TERMS = 4


def check_int(argument: str, value: Any, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{argument}={value!r} must be an integer ≥ {minimum}")


def check_bool(argument: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{argument}={value!r} must be True or False")


def check_probability(argument: str, value: Any) -> None:
    """A dropout probability: a number in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{argument}={value!r} is not a probability in [0, 1); use e.g. 0.0 (off) or 0.1")


def check_init_weights(init_weights: Any) -> None:
    """peft's ``init_weights`` values for orthogonal methods: ``True`` (identity) or ``False`` (random)."""
    if init_weights is not True and init_weights is not False:
        raise ValueError(f"init_weights={init_weights!r} is not supported; use True (identity) or False (random)")


def check_coft_eps(eps: Any) -> None:
    """The COFT radius: a positive number."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps={eps!r} must be a positive number (the COFT radius); peft's default is 6e-5")


def check_bias(bias: Any, method_only: str) -> None:
    """peft's ``bias`` modes: ``"none"``, ``"all"`` or the method's own (``"oft_only"``, ``"boft_only"``, …)."""
    allowed = ("none", "all", method_only)
    if bias not in allowed:
        raise ValueError(f"bias={bias!r} must be one of {list(allowed)}")


def check_peft_neumann_terms(terms: Any) -> None:
    """A config's ``num_cayley_neumann_terms`` with the series on: at least :data:`MIN_PEFT_NEUMANN_TERMS`."""
    check_int("num_cayley_neumann_terms", terms)
    if terms < MIN_PEFT_NEUMANN_TERMS:
        raise ValueError(
            f"num_cayley_neumann_terms={terms} is too few: with fewer than {MIN_PEFT_NEUMANN_TERMS} terms peft's "
            "series is another polynomial than the Cayley-Neumann truncation, so the adapter file would mean "
            "different rotations in the two libraries; use 5 (the default) or use_cayley_neumann=False"
        )


def check_exactly_one(count: tuple[str, int], size: tuple[str, int], example: str) -> None:
    """A number of blocks and a block size whose product is the layer width: exactly one may be set."""
    for argument, value in (count, size):
        check_int(argument, value)
    (count_name, count_value), (size_name, size_value) = count, size
    if not count_value and not size_value:
        raise ValueError(f"{count_name}=0 and {size_name}=0: set one of them, e.g. {example}")
    if count_value and size_value:
        raise ValueError(
            f"{count_name}={count_value} and {size_name}={size_value}: set only one, since their product is the "
            f"layer width; e.g. {example}"
        )


#: Which features an adapter rotates: the layer's ``"input"`` (peft's OFT and BOFT, ``W ↦ W Rᵀ``) or its
#: ``"output"`` (LyCORIS's ``diag-oft`` and ``boft``, ``W ↦ s ⊙ (Rᵀ W)``).
ROTATION_SIDES = ("input", "output")


def check_rotation_side(value: Any) -> None:
    """``rotation_side`` is one of :data:`ROTATION_SIDES`."""
    if value not in ROTATION_SIDES:
        raise ValueError(
            f"rotation_side={value!r} must be 'input' (rotate what the layer reads, as peft) or 'output' (rotate "
            "what it writes, as LyCORIS's diag-oft and boft)"
        )


def check_constraint(value: Any) -> None:
    """LyCORIS's ``constraint`` (its ``alpha``): a number ≥ 0, 0 meaning no constraint."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(
            f"constraint={value!r} must be a number ≥ 0: all of a layer's generators together are kept within "
            "‖Q‖_F ≤ constraint · features (LyCORIS's alpha); 0 turns it off"
        )
