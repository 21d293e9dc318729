"""Adapter configurations: :class:`OFTConfig`, :class:`BOFTConfig`, :class:`HRAConfig`, with peft 0.21.2's fields.

A config is what ``adapter_config.json`` holds. The file is peft's: the same keys, the same values, concrete
integers for block sizes, and ``"peft_type"`` naming the method, so either library reads what the other wrote::

    OFTConfig(r=8, target_modules=["q_proj", "v_proj"])         # 8 blocks per layer, block size derived
    OFTConfig(oft_block_size=32, target_modules="all-linear")   # blocks of 32, every linear layer but the head
    BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["query", "value"])

Differences from peft, all on the side of failing early: ``OFTConfig(r=8)`` works without also clearing
``oft_block_size`` (it defaults to 32 only when ``r`` is 0); every field is checked when the config is made,
and the error names the field, its value and the fix; a file of another ``peft_type`` is refused by name.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from orthotune.atomic_write import write_atomic
from orthotune.validation import (
    check_bias,
    check_bool,
    check_coft_eps,
    check_constraint,
    check_exactly_one,
    check_init_weights,
    check_int,
    check_peft_neumann_terms,
    check_probability,
    check_rotation_side,
)

if TYPE_CHECKING:
    from orthotune.adapter_layer import AdapterLayer
    from orthotune.base_layer import LayerKind

#: The peft release whose adapter files orthotune reads and writes; written as ``peft_version``.
PEFT_FORMAT_VERSION = "0.21.2"
CONFIG_NAME = "adapter_config.json"
#: ``target_modules`` shorthand for every linear layer except the output head.
ALL_LINEAR = "all-linear"
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


class PeftType(str, enum.Enum):
    """peft's ``PeftType`` for the methods orthotune has: a string (``PeftType.OFT == "OFT"``) with ``.value``.

    ``config.peft_type`` is one of these; JSON writes it as the plain string, as peft does. A new method adds its
    member here and names it as its config's ``PEFT_TYPE``.
    """

    OFT = "OFT"
    BOFT = "BOFT"
    HRA = "HRA"

    def __str__(self) -> str:  # "OFT" in messages, not "PeftType.OFT"
        return self.value


class MissingPeftTypeError(TypeError, ValueError):
    """A config file without ``peft_type`` that cannot be read without it (a ``TypeError`` as in peft)."""


def _names(value: Any, argument: str) -> list[str] | str | None:
    """``target_modules``-like values: ``None``, a regex string, or a duplicate-free list of names."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(name, str) for name in value):
        raise ValueError(
            f"{argument}={value!r} must be a list of module names or one regex string, e.g. ['q_proj', 'v_proj']"
        )
    return list(dict.fromkeys(value))


def _name_set(value: Any, argument: str) -> set[str] | str | None:
    """As :func:`_names`, names kept as a set: peft stores ``target_modules`` and ``exclude_modules`` so."""
    names = _names(value, argument)
    return set(names) if isinstance(names, list) else names


@dataclass
class AdapterConfig:
    """Fields every adapter config shares with peft's ``PeftConfig`` (see :class:`OFTConfig` for their meaning)."""

    #: The method's name in peft's files (a :class:`PeftType`); a subclass with one is registered for
    #: :meth:`from_dict`.
    PEFT_TYPE: ClassVar[str] = ""
    #: Fields peft does not have; written to ``adapter_config.json`` only when not at their default, so that a
    #: config peft can express is saved exactly as peft saves it.
    _ORTHOTUNE_ONLY: ClassVar[tuple[str, ...]] = ()
    #: The method's own ``bias`` choice besides ``"none"`` and ``"all"`` (``"oft_only"``, ``"boft_only"``).
    _BIAS_ONLY: ClassVar[str] = ""
    #: peft's ``prefix`` of the method's parameter names (``"oft_"``).
    prefix: ClassVar[str] = ""
    #: Every method's config class by ``PEFT_TYPE``, filled in as the classes are defined.
    _registry: ClassVar[dict[str, type[AdapterConfig]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.PEFT_TYPE:
            AdapterConfig._registry[cls.PEFT_TYPE] = cls

    #: Module names (kept as a set, as peft keeps them; a list is accepted), a regex, or ``"all-linear"``.
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    bias: str = "none"
    init_weights: bool = True
    fan_in_fan_out: bool = False
    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    auto_mapping: dict[str, Any] | None = None
    #: The peft version that wrote the file this config was read from; a config made in code has the version whose
    #: files orthotune writes (peft fills in its own version the same way).
    peft_version: str | None = field(default=None, compare=False)
    peft_type: PeftType | str = ""
    #: Keys of a file that this version does not know, kept so that saving writes them back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.peft_type and self.peft_type != self.PEFT_TYPE:
            raise ValueError(f"peft_type={self.peft_type!r} does not match {type(self).__name__}; leave it out")
        self.peft_type = PeftType(self.PEFT_TYPE)
        if self.peft_version is None:
            self.peft_version = PEFT_FORMAT_VERSION
        self.target_modules = _name_set(self.target_modules, "target_modules")
        self.exclude_modules = _name_set(self.exclude_modules, "exclude_modules")
        self.layers_pattern = _names(self.layers_pattern, "layers_pattern")
        if self.modules_to_save is not None:
            names = _names(self.modules_to_save, "modules_to_save")
            if isinstance(names, str):
                raise ValueError(f"modules_to_save={names!r} must be a list of module names, e.g. ['classifier']")
            self.modules_to_save = names
        layers = self.layers_to_transform
        if layers is not None:
            if isinstance(layers, (list, tuple)):
                for index in layers:
                    check_int("layers_to_transform", index)
                self.layers_to_transform = list(layers)
            else:
                check_int("layers_to_transform", layers)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"layers_pattern={self.layers_pattern!r} needs layers_to_transform (the layer indices to adapt)"
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            warnings.warn(
                f"layers_to_transform={self.layers_to_transform!r} is ignored when target_modules is a regex (as in "
                "peft); put the layer indices into the regex, or give target_modules as a list of names",
                stacklevel=3,
            )
        check_bias(self.bias, self._BIAS_ONLY)
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type={self.task_type!r} must be None or one of {list(TASK_TYPES)}")
        check_init_weights(self.init_weights)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_bool("inference_mode", self.inference_mode)

    # -------------------------------------------------------------------------------------------- method
    def layer_kwargs(self) -> dict[str, Any]:
        """The arguments of the method's ``update_layer`` that this config decides."""
        raise NotImplementedError

    def layer_class(self, kind: LayerKind) -> type[AdapterLayer]:
        """The method's layer class for a base layer of ``kind`` (a ``TypeError`` where it has none)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- dict
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict of ``adapter_config.json``, as peft 0.21.2 writes it."""
        data = dict(self.extra)
        for item in dataclasses.fields(self):
            if item.name == "extra":
                continue
            value = getattr(self, item.name)
            if item.name in self._ORTHOTUNE_ONLY and value == item.default:
                continue
            # peft writes its sets as lists; sorted, the file is the same on every run
            data[item.name] = sorted(value) if isinstance(value, set) else copy.deepcopy(value)
        data["peft_version"] = PEFT_FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """The config a dict describes: an :class:`OFTConfig`, :class:`BOFTConfig` or :class:`HRAConfig` by its
        ``peft_type``.

        Keys this version does not know are kept (and written back when saving) with a warning; a
        ``peft_type`` other than ``"OFT"``, ``"BOFT"`` and ``"HRA"`` is refused.
        """
        if not isinstance(data, dict):
            raise ValueError(f"an adapter config must be a JSON object, not {type(data).__name__}")
        peft_type = data.get("peft_type", cls.PEFT_TYPE or None)
        config_classes = AdapterConfig._registry
        if "peft_type" not in data:
            cls._check_readable_without_peft_type(data)
        if peft_type not in config_classes:
            raise ValueError(
                f"peft_type={peft_type!r}: orthotune reads {', '.join(config_classes)} adapters only; "
                + ("this is another kind of peft adapter, load it with peft" if peft_type else "the key is missing")
            )
        config_class = config_classes[peft_type]
        if cls.PEFT_TYPE and config_class is not cls:
            raise ValueError(f"peft_type={peft_type!r} is not a {cls.__name__}; use AdapterConfig.from_dict")
        known = {item.name for item in dataclasses.fields(config_class)} - {"extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"adapter config keys {unknown} are unknown to orthotune (written by a newer peft?); they are "
                "ignored here and written back unchanged when saving",
                stacklevel=2,
            )
        kwargs = {key: value for key, value in data.items() if key in known}
        return config_class(**kwargs, extra={key: data[key] for key in unknown})

    @classmethod
    def _check_readable_without_peft_type(cls, data: dict[str, Any]) -> None:
        """peft reads a dict without ``peft_type`` as its class only when every key is one of the class's fields."""
        known = {item.name for item in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(data) - known)
        if not cls.PEFT_TYPE or unknown:
            raise MissingPeftTypeError(
                f"The {cls.__name__} config that is trying to be loaded is missing required keys: {{'peft_type'}}"
                + (f" (and has keys {unknown} that a {cls.__name__} does not know)" if cls.PEFT_TYPE else "")
                + '; the file was not written by peft or orthotune: add "peft_type" (e.g. "OFT" or "BOFT") to it'
            )

    # ---------------------------------------------------------------------------------------------- file
    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (atomically: a crash keeps the old file)."""
        os.makedirs(save_directory, exist_ok=True)
        write_atomic(os.path.join(save_directory, CONFIG_NAME), self.to_json_string().encode())

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike[str], subfolder: str | None = None, **kwargs: Any
    ) -> AdapterConfig:
        """Read ``adapter_config.json`` from a local directory (JSON only, nothing is unpickled).

        Args:
            pretrained_model_name_or_path: the directory.
            subfolder: a subdirectory of it.
            kwargs: peft's Hub download arguments (``revision``, ``token``, …); unused for a local directory.
        """
        directory = (
            os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        )
        return cls.from_dict(cls.from_json_file(os.path.join(directory, CONFIG_NAME)))

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike[str], **kwargs: Any) -> dict[str, Any]:
        """The JSON object in a config file, as a dict (peft's classmethod of the same name returns the dict too)."""
        data = read_config_file(path_json_file)
        if isinstance(data, dict) and "runtime_config" in data:
            warnings.warn(
                f"{os.fspath(path_json_file)} has a runtime_config key, which is ignored (as in peft): runtime "
                "settings are not stored in files",
                stacklevel=2,
            )
            del data["runtime_config"]
        return data


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``path``, or a ``ValueError`` that says what is wrong with the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter config at {os.fspath(path)!r}; save one with save_pretrained(directory)")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{os.fspath(path)!r} is not valid JSON ({error}); the file is damaged") from error


@dataclass
class OFTConfig(AdapterConfig):
    """Orthogonal fine-tuning (OFT; Qiu et al., 2023) of a whole model, as peft 0.21.2's ``OFTConfig``.

    Args:
        r: number of rotation blocks per adapted layer; 0 to derive it from ``oft_block_size``.
        oft_block_size: size ``b`` of each block; ``None`` means 32 when ``r`` is 0 and 0 (derived) otherwise.
            Exactly one of ``r`` and ``oft_block_size`` is non-zero; a value that does not divide a layer's
            width is moved to the nearest divisor with a warning.
        module_dropout: multiplicative dropout: the fraction of blocks set to the identity in each training step.
        coft: constrained OFT: keep each generator within ``eps`` of zero (``eps/√r`` for ``r`` blocks).
        eps: the COFT radius.
        block_share: one block shared along the whole width.
        use_cayley_neumann: Cayley-Neumann series instead of the exact Cayley transform: a truncation that
            tends to the same rotation as terms are added (off from it by ``‖Q‖₂^(n-1)``).
        num_cayley_neumann_terms: terms of that series (at least 4: peft's series with fewer terms is a
            different polynomial).
        target_modules: module names (a module is adapted when its full name equals or ends with ``.name``), one
            regex matched against the full name, or ``"all-linear"``; ``None`` uses the model type's default.
        exclude_modules: names or a regex, as ``target_modules``, of modules never adapted.
        layers_to_transform: layer indices to adapt (with a list ``target_modules`` only).
        layers_pattern: name of the ``nn.ModuleList`` holding the layers, e.g. ``"layers"`` or ``"h"``.
        modules_to_save: modules (e.g. a new classifier head) trained in full and saved with the adapter.
        bias: ``"none"``, ``"all"`` or ``"oft_only"``: which biases train (and are saved with the adapter).
        init_weights: ``True`` starts from the identity rotation, ``False`` from small random rotations.
        fan_in_fan_out: kept for peft; the weight layout of every layer is detected.
        task_type: peft's task type; ``"SEQ_CLS"`` and ``"TOKEN_CLS"`` add the classifier head to
            ``modules_to_save`` and ``"QUESTION_ANS"`` the ``qa_outputs`` head, as peft does.
        inference_mode: adapters are frozen.
        rotation_side: ``"input"`` (peft's OFT: ``W ↦ W Rᵀ``) or ``"output"`` (LyCORIS's ``diag-oft``: the layer's
            outputs are rotated before the bias, ``W ↦ s ⊙ (Rᵀ W)``); with ``"output"`` the blocks divide
            ``out_features``. Not a peft field: written to files only when ``"output"``.
        rescale: with ``rotation_side="output"``, a trainable per-output scale ``s`` (LyCORIS's ``rescaled``).
        constraint: LyCORIS's ``alpha``: all of a layer's generators together within ``‖Q‖_F ≤ constraint · d``
            (``d`` the rotated width); 0 for none.
    """

    PEFT_TYPE: ClassVar[str] = PeftType.OFT
    _BIAS_ONLY: ClassVar[str] = "oft_only"
    prefix: ClassVar[str] = "oft_"
    _ORTHOTUNE_ONLY: ClassVar[tuple[str, ...]] = ("rotation_side", "rescale", "constraint")

    r: int = 0
    oft_block_size: int | None = None
    module_dropout: float = 0.0
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    rotation_side: str = "input"
    rescale: bool = False
    constraint: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.oft_block_size is None:
            self.oft_block_size = 32 if self.r == 0 else 0
        check_exactly_one(("r", self.r), ("oft_block_size", self.oft_block_size), "r=8 or oft_block_size=32")
        check_probability("module_dropout", self.module_dropout)
        check_bool("coft", self.coft)
        check_bool("block_share", self.block_share)
        check_bool("use_cayley_neumann", self.use_cayley_neumann)
        check_coft_eps(self.eps)
        check_int("num_cayley_neumann_terms", self.num_cayley_neumann_terms)
        if self.use_cayley_neumann:
            check_peft_neumann_terms(self.num_cayley_neumann_terms)
        check_rotation_side(self.rotation_side)
        check_bool("rescale", self.rescale)
        if self.rescale and self.rotation_side != "output":
            raise ValueError("rescale=True scales the rotated outputs; it needs rotation_side='output'")
        check_constraint(self.constraint)

    def layer_kwargs(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "oft_block_size": self.oft_block_size,
            "module_dropout": self.module_dropout,
            "coft": self.coft,
            "eps": self.eps,
            "block_share": self.block_share,
            "init_weights": self.init_weights,
            "use_cayley_neumann": self.use_cayley_neumann,
            "num_cayley_neumann_terms": self.num_cayley_neumann_terms,
            "inference_mode": self.inference_mode,
            "rotation_side": self.rotation_side,
            "rescale": self.rescale,
            "constraint": self.constraint,
        }

    def layer_class(self, kind: LayerKind) -> type[AdapterLayer]:
        from orthotune.oft import layer_class

        return layer_class(kind)


@dataclass
class BOFTConfig(AdapterConfig):
    """Butterfly orthogonal fine-tuning (BOFT; Liu et al., 2024) of a whole model, as peft 0.21.2's ``BOFTConfig``.

    Args:
        boft_block_size: size ``b`` of each block; 0 to derive it from ``boft_block_num``.
        boft_block_num: number of blocks per factor; 0 to derive it from ``boft_block_size``. Exactly one of
            the two is non-zero.
        boft_n_butterfly_factor: number ``m`` of butterfly factors (1 is plain block-diagonal OFT). Unlike peft,
            ``m > 1`` works on every device.
        boft_dropout: multiplicative dropout: the fraction of one factor's blocks set to the identity per step.
        bias: ``"none"``, ``"all"`` or ``"boft_only"``.
        rotation_side: ``"input"`` (peft's BOFT) or ``"output"`` (LyCORIS's ``boft``: its butterfly, which
            interleaves every stage including the first, on the layer's outputs; ``boft_s`` is its ``rescale``).
        constraint: LyCORIS's ``alpha``, as in :class:`OFTConfig`, over the generators of all factors.

    The other fields mean what they mean in :class:`OFTConfig`.
    """

    PEFT_TYPE: ClassVar[str] = PeftType.BOFT
    _BIAS_ONLY: ClassVar[str] = "boft_only"
    prefix: ClassVar[str] = "boft_"
    _ORTHOTUNE_ONLY: ClassVar[tuple[str, ...]] = ("rotation_side", "constraint")

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    rotation_side: str = "input"
    constraint: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_exactly_one(
            ("boft_block_num", self.boft_block_num), ("boft_block_size", self.boft_block_size), "boft_block_size=4"
        )
        check_int("boft_n_butterfly_factor", self.boft_n_butterfly_factor, minimum=1)
        check_probability("boft_dropout", self.boft_dropout)
        check_rotation_side(self.rotation_side)
        check_constraint(self.constraint)

    def layer_kwargs(self) -> dict[str, Any]:
        return {
            "boft_block_size": self.boft_block_size,
            "boft_block_num": self.boft_block_num,
            "boft_n_butterfly_factor": self.boft_n_butterfly_factor,
            "boft_dropout": self.boft_dropout,
            "init_weights": self.init_weights,
            "inference_mode": self.inference_mode,
            "rotation_side": self.rotation_side,
            "constraint": self.constraint,
        }

    def layer_class(self, kind: LayerKind) -> type[AdapterLayer]:
        from orthotune.boft import layer_class

        return layer_class(kind)


@dataclass
class HRAConfig(AdapterConfig):
    """Householder reflection adaptation (HRA; Yuan et al., NeurIPS 2024) of a whole model, as peft 0.21.2's
    ``HRAConfig``.

    Args:
        r: number of Householder reflections per adapted layer. Keep it even: the identity initialisation pairs
            equal reflections, and with an odd ``r`` the adapter starts from a random orthogonal matrix (as in
            peft, with a warning).
        apply_GS: orthonormalise the reflection vectors (Gram–Schmidt) and use ``H = I − 2QQᵀ``. Gram–Schmidt
            of the paired vectors of the identity initialisation is undefined, so a new adapter with
            ``apply_GS=True`` should be made with ``init_weights=False``.
        init_weights: ``True`` starts from the identity (for an even ``r`` without ``apply_GS``), ``False`` from
            random reflections.
        bias: ``"none"``, ``"all"`` or ``"hra_only"``.

    The other fields mean what they mean in :class:`OFTConfig`.
    """

    PEFT_TYPE: ClassVar[str] = "HRA"
    _BIAS_ONLY: ClassVar[str] = "hra_only"
    prefix: ClassVar[str] = "hra_"

    r: int = 8
    apply_GS: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, minimum=1)
        check_bool("apply_GS", self.apply_GS)

    def layer_kwargs(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "apply_GS": self.apply_GS,
            "init_weights": self.init_weights,
            "inference_mode": self.inference_mode,
        }

    def layer_class(self, kind: LayerKind) -> type[AdapterLayer]:
        from orthotune.hra import layer_class

        return layer_class(kind)

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`AdapterConfig.to_dict`, without ``fan_in_fan_out`` when it is ``False``: peft's HRAConfig
        has no such field, and peft warns about a key it does not know."""
        data = super().to_dict()
        if not self.fan_in_fan_out:
            del data["fan_in_fan_out"]
        return data


def as_orthotune_config(config: Any) -> AdapterConfig:
    """An orthotune config, also from a peft ``OFTConfig``/``BOFTConfig`` (through its dict)."""
    if isinstance(config, AdapterConfig):
        return config
    peft_type = getattr(config, "peft_type", None)
    peft_type = getattr(peft_type, "value", peft_type)  # peft's PeftType enum
    if peft_type in AdapterConfig._registry and callable(getattr(config, "to_dict", None)):
        data = {
            key: sorted(value) if isinstance(value, set) else getattr(value, "value", value)  # peft's enums
            for key, value in config.to_dict().items()
        }
        return AdapterConfig.from_dict(data)
    raise TypeError(
        f"expected an orthotune config ({', '.join(sorted(AdapterConfig._registry))}), got {type(config).__name__}"
    )
