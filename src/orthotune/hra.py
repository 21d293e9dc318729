"""HRA: Householder reflection adaptation (Yuan et al., NeurIPS 2024, arXiv:2405.17484).

Each adapter is ``r`` vectors, the columns of ``hra_u: (d, r)``, and the orthogonal matrix ``H`` they make
(:mod:`orthotune.functional.householder`; peft 0.21.2's ``get_delta_weight``)::

    x ──► x Hᵀ ──► base layer (frozen W, b)          H = (I − 2u_0u_0ᵀ/‖u_0‖²) ⋯ (I − 2u_{r−1}u_{r−1}ᵀ/‖u_{r−1}‖²)
    merged:  W ↦ W H                                  or, with apply_GS, H = I − 2QQᵀ, Q = Gram–Schmidt(U)

``x Hᵀ = x − (x U) Tᵀ Uᵀ`` (compact WY form, ``T`` an ``r × r`` triangular matrix): a linear layer's forward
costs two thin products, like a LoRA adapter of rank ``r``, and keeps only ``x`` for backward. peft builds
the dense ``d × d`` matrix ``H``, multiplies it into an identity (``d³``) and into ``W`` (``out·d²``), every
step, and back again in backward.

Storage is peft's: ``hra_u[name]`` of shape ``(in_features, r)`` for a linear layer and
``(in_channels·kh·kw, r)`` for Conv2d, in the ``(in, kh, kw)`` order of the flattened weight. peft sizes it
``in_channels·kh²`` (``kernel_size[0]`` squared), which breaks non-square kernels; here it is the real
``kh·kw``, the same for square kernels.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from orthotune.adapter_layer import AdapterLayer
from orthotune.base_layer import LayerKind, weight_matrix
from orthotune.functional import (
    householder_compose,
    householder_dense,
    householder_rotate_activations,
    householder_rotate_weight,
    householder_unrotate_weight,
    householder_wy,
)
from orthotune.validation import check_bool, check_init_weights, check_int

__all__ = ["Conv2d", "HRALayer", "Linear", "layer_class"]


class HRALayer(AdapterLayer):
    """Shared HRA bookkeeping; use :class:`Linear` or :class:`Conv2d`.

    Several active adapters ``[a, b]`` make ``H = H_a H_b`` (merged ``W H_a H_b``, the first active adapter
    next to the base layer), applied to the activations as one WY form, so backward still keeps one ``x``.
    """

    adapter_layer_names: tuple[str, ...] = ("hra_u",)
    other_param_names: tuple[str, ...] = ("hra_r", "hra_apply_GS")
    #: The base layer kinds a class adapts.
    _kinds: tuple[LayerKind, ...] = (LayerKind.LINEAR, LayerKind.CONV1D, LayerKind.CONV2D)

    constructor_arguments: tuple[str, ...] = ("r", "apply_GS", "init_weights", "fan_in_fan_out")
    strength_unsupported = (
        "HRA has no strength: a chain of reflections H = ∏(I − 2uuᵀ) has no canonical path from I to H (scaling "
        "the vectors u changes nothing, and a power H^t is not a product of r reflections); use set_adapter or "
        "disable_adapter to switch it on and off"
    )

    def _create_adapter_holders(self) -> None:
        if self.kind not in self._kinds:
            raise TypeError(
                f"{type(self).__name__} cannot adapt {type(self.base_layer).__name__}; HRA adapts nn.Linear "
                "(hra.Linear) and nn.Conv2d (hra.Conv2d), like peft"
            )
        self.hra_u = nn.ParameterDict()
        self.hra_r: dict[str, int] = {}
        self.hra_apply_GS: dict[str, bool] = {}

    def update_layer(
        self,
        adapter_name: str,
        r: int = 8,
        apply_GS: bool = False,
        init_weights: bool = True,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Add (or replace) the adapter ``adapter_name``: ``r`` Householder vectors of ``rotated_features``."""
        if kwargs:
            raise TypeError(f"unexpected HRA arguments {sorted(kwargs)}; see orthotune.hra.HRALayer.update_layer")
        features = self.rotated_features
        check_int("r", r, minimum=1)
        check_bool("apply_GS", apply_GS)
        if apply_GS and r > features:
            raise ValueError(
                f"r={r} with apply_GS=True: at most {features} vectors are orthonormal in this layer's {features} "
                f"features; use r ≤ {features} or apply_GS=False"
            )
        check_init_weights(init_weights)
        self.hra_u[adapter_name] = nn.Parameter(torch.empty(features, r, device=self._adapter_device()))
        self.hra_r[adapter_name] = r
        self.hra_apply_GS[adapter_name] = apply_GS
        if init_weights:
            self.reset_hra_parameters(adapter_name)
        else:
            self.reset_hra_parameters_random(adapter_name)
        self._register_new_adapter(adapter_name, inference_mode)

    def reset_hra_parameters(self, adapter_name: str) -> None:
        """peft's identity initialisation: ``r/2`` random vectors, each repeated twice (``H_i H_i = I``).

        An odd ``r`` has no such pairing: as in peft, the vectors are then random (``H`` a random orthogonal
        matrix, not the identity) and a warning says so. With ``apply_GS=True`` the pairs make ``U`` rank
        deficient, which Gram–Schmidt cannot orthonormalise: ``H`` is then not the identity either (peft's is
        not even orthogonal), and a warning says so. The random numbers are drawn on the CPU in peft's order,
        so a seed gives peft's values.
        """
        u = self.hra_u[adapter_name]
        rank = u.shape[1]
        if rank % 2:
            warnings.warn(
                f"r={rank} is odd, so adapter {adapter_name!r} cannot start from the identity (its reflections come "
                "in equal pairs); it starts from random reflections, as in peft; use an even r",
                stacklevel=3,
            )
            self.reset_hra_parameters_random(adapter_name)
            return
        if self.hra_apply_GS[adapter_name]:
            warnings.warn(
                f"adapter {adapter_name!r}: apply_GS=True with init_weights=True pairs equal vectors, which "
                "Gram-Schmidt cannot orthonormalise (H is not the identity and its gradient is not defined; "
                "peft's H is not even orthogonal there); create it with init_weights=False",
                stacklevel=3,
            )
        half = torch.zeros(u.shape[0], rank // 2)
        nn.init.kaiming_uniform_(half, a=math.sqrt(5))
        with torch.no_grad():
            u.copy_(torch.repeat_interleave(half, 2, dim=1))

    def reset_hra_parameters_random(self, adapter_name: str) -> None:
        """Random vectors, peft's ``kaiming_uniform_(a=√5)`` (drawn on the CPU, as peft does)."""
        u = self.hra_u[adapter_name]
        values = torch.empty(u.shape)
        nn.init.kaiming_uniform_(values, a=math.sqrt(5))
        with torch.no_grad():
            u.copy_(values)

    # -------------------------------------------------------------------------------------------- math
    def householder_wy(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V, T)`` in fp32 with ``H = I − V T Vᵀ`` for one adapter."""
        return householder_wy(self.hra_u[adapter_name], self.hra_apply_GS[adapter_name])

    def _active_wy(self, active: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V, T)`` of ``H_{a_1} H_{a_2} ⋯`` over the active adapters, in active order."""
        return householder_compose([self.householder_wy(name) for name in active])

    def get_delta_weight(self, adapter_name: str, reverse: bool = False) -> torch.Tensor:
        """peft's dense ``(d, d)`` matrix ``H`` (merged weight ``W H``; activations map as ``x ↦ x Hᵀ``), or
        ``Hᵀ = H⁻¹`` with ``reverse``. For inspection: nothing else builds it."""
        dense = householder_dense(self.hra_u[adapter_name], self.hra_apply_GS[adapter_name])
        return dense.t() if reverse else dense

    def _merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        v, t = self.householder_wy(adapter_name)
        return householder_rotate_weight(weight, v.to(weight.dtype), t.to(weight.dtype))

    def _unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        v, t = self.householder_wy(adapter_name)
        return householder_unrotate_weight(weight, v.to(weight.dtype), t.to(weight.dtype))

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """``{"hra_u": (d, r)}``, as peft's files name it."""
        return {"hra_u": self.hra_u[adapter_name]}

    def __repr__(self) -> str:
        return "hra." + super().__repr__()


class Linear(HRALayer):
    """HRA on ``nn.Linear`` (also transformers' ``Conv1D`` or any layer with ``in_features``/``out_features``,
    which peft does not adapt): the input is rotated to ``x Hᵀ`` and the base layer runs untouched.

    Shapes:
        ``x: (..., in_features)`` → ``(..., out_features)``, in the dtype of ``x``.
    """

    _kinds = (LayerKind.LINEAR, LayerKind.CONV1D)

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        v, t = self._active_wy(active)
        rotated = householder_rotate_activations(x, v.to(x.dtype), t.to(x.dtype))
        return self._base_forward_on_rotated(rotated, *args, **kwargs)


class Conv2d(HRALayer):
    """HRA on ``nn.Conv2d`` (``groups=1``), reflecting the ``in_channels·kh·kw`` features of every patch.

    Forward rotates the weight (``W ↦ W H``, ``2·out·d·r`` multiply-adds, no ``d × d`` matrix) and runs the
    base convolution with it, as peft does, but with the base layer's own stride, padding, padding mode and
    dilation (peft passes ``stride[0]`` and ``padding[0]`` only) and non-square kernels.

    Shapes:
        ``x: (N, C_in, H, W)`` → ``(N, C_out, H', W')``.
    """

    _kinds = (LayerKind.CONV2D,)

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        base: Any = self.base_layer
        weight = weight_matrix(base, self.kind)
        v, t = self._active_wy(active)
        weight = householder_rotate_weight(weight, v.to(weight.dtype), t.to(weight.dtype))
        return base._conv_forward(x, weight.reshape(base.weight.shape), base.bias)


def layer_class(kind: LayerKind) -> type[HRALayer]:
    """The HRA layer class for a base layer of ``kind``; embeddings are refused, as in peft."""
    if kind is LayerKind.EMBEDDING:
        raise TypeError("HRA cannot adapt an embedding (neither can peft); leave it out of target_modules")
    return Conv2d if kind is LayerKind.CONV2D else Linear
