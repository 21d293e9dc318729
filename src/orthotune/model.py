"""Whole models: find the layers to adapt, wrap them in OFT/BOFT/HRA layers, and give peft's model API.

    get_peft_model(model, OFTConfig(r=8, target_modules=["q_proj", "v_proj"]))
      └─ OrthoModel                                  (peft's PeftModel: save, load, merge, adapters by name)
           └─ base_model: OrthoTuner                 (peft's tuner: holds the model)
                └─ model: the user's model, each target replaced in place:
                     q_proj ─► oft.Linear(base_layer=q_proj, oft_R={"default": …})

The structure, and with it every state-dict key, is peft's: ``base_model.model.<path>.base_layer.weight``,
``base_model.model.<path>.oft_R.<adapter>.weight``. This module owns the adapter lifecycle only: which modules
are adapted is :mod:`orthotune.targeting`'s question, how an adapter is laid out in files
:mod:`orthotune.checkpoint`'s, and what a layer computes its method's module's.

Nothing of the model changes until an adapter is known to fit: layers are built beside the model first
(they only reference the base layers), loaded files are checked against them, and only then are they put in.

This module imports neither transformers nor peft; transformers models are handled through their methods.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from orthotune.adapter_layer import BASE_ADAPTER_NAME, ActiveAdapters, AdapterLayer
from orthotune.checkpoint import (
    adapter_file_tensors,
    check_tensors,
    convert_legacy_oft,
    copy_tensors,
    optional_file_tensors,
    own_file_tensors,
    read_adapter_files,
    save_model_adapters,
    to_peft_convention,
)
from orthotune.config import AdapterConfig, as_orthotune_config
from orthotune.injection import AdapterPlan, commit_plan, plan_adapter
from orthotune.modules_to_save import ModulesToSaveWrapper
from orthotune.targeting import top_level_modules

__all__ = ["OrthoModel", "OrthoTuner", "PeftModel", "get_peft_model"]


# ----------------------------------------------------------------------------------------------- the model
class _ForwardsAttributes(nn.Module):
    """Attributes this module lacks are read from the module it wraps (named by ``_inner``)."""

    _inner: str

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self._inner:
                raise
            return getattr(getattr(self, self._inner), name)


class OrthoTuner(_ForwardsAttributes):
    """Holds the adapted model as ``model``: peft's ``PeftModel.base_model``, which makes the keys peft's."""

    _inner = "model"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class OrthoModel(ActiveAdapters, _ForwardsAttributes):
    """A model with named OFT/BOFT/HRA adapters and peft's ``PeftModel`` API (also exported as ``PeftModel``).

    Calls and attributes not defined here go to the wrapped model (``model.config``, ``generate``,
    ``gradient_checkpointing_enable``, …). Build one with :func:`get_peft_model` or :meth:`from_pretrained`.

    Args:
        model: the model to adapt (modified in place when an adapter is added).
        peft_config: the first adapter's config, or ``None`` to start without adapters.
        adapter_name: the first adapter's name.
    """

    _inner = "base_model"

    def __init__(self, model: nn.Module, peft_config: AdapterConfig | None = None, adapter_name: str = "default"):
        super().__init__()
        if isinstance(model, OrthoModel):
            raise TypeError("the model is already an OrthoModel; add adapters with add_adapter(name, config)")
        adapted = [name for name, module in model.named_modules() if isinstance(module, AdapterLayer)]
        if adapted:
            # Adapting in place (as from_pretrained(pipe.unet, ...) does) twice leaves the first adapters in the
            # layers, inactive but still there; peft warns about the same thing.
            warnings.warn(
                f"the model already holds orthotune adapter layers ({adapted[0]!r} and {len(adapted) - 1} more): "
                "the new adapter is added next to the old ones, which stay in the model; keep the first "
                "OrthoModel and call add_adapter / load_adapter on it, or unload() it before wrapping again",
                stacklevel=2,
            )
        self.base_model = OrthoTuner(model)
        self.peft_config: dict[str, AdapterConfig] = {}
        self._active_adapters: list[str] = []
        # The forward signature is the wrapped model's, so that tools that inspect it (transformers' Trainer
        # keeps only the batch columns forward accepts) see input_ids, labels, … and not *args, **kwargs.
        forward = functools.partial(type(self).forward, self)
        with contextlib.suppress(TypeError, ValueError):
            forward.__signature__ = inspect.signature(model.forward)  # type: ignore[attr-defined]
        self.forward = forward  # type: ignore[method-assign]
        if peft_config is not None:
            self.add_adapter(adapter_name, peft_config)

    # ------------------------------------------------------------------------------------- pass-through
    def get_base_model(self) -> nn.Module:
        """The wrapped model itself, with its adapted layers in place."""
        return self.base_model.model

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward; ``adapter_names`` (inference only) gives each sample its own adapter,
        ``"__base__"`` for none."""
        with self._adapter_names_applied(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``, with ``adapter_names`` as in :meth:`forward`."""
        with self._adapter_names_applied(adapter_names):
            generate: Any = self.get_base_model().generate
            return generate(*args, **kwargs)

    @contextlib.contextmanager
    def _adapter_names_applied(self, adapter_names: Sequence[str] | None) -> Iterator[None]:
        """Pass ``adapter_names`` to every adapter layer and wrapper for the duration of one call."""
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names={adapter_names!r} must be a list with one adapter name per sample")
        adapter_names = list(adapter_names)
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {BASE_ADAPTER_NAME})
        if unknown:
            raise ValueError(
                f"adapter_names has unknown adapters {unknown}; this model has {list(self.peft_config)} and "
                f"{BASE_ADAPTER_NAME!r} for the base model"
            )
        if self.get_base_model().training:
            raise RuntimeError("adapter_names (one adapter per sample) works in inference only; call model.eval()")
        merged = sorted({name for _, layer in self.adapter_layers() for name in layer.merged_adapters})
        if merged:
            raise ValueError(f"adapter_names cannot be used while adapters {merged} are merged; call unmerge_adapter()")

        def pass_names(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return args, {**kwargs, "adapter_names": adapter_names}

        handles = [
            module.register_forward_pre_hook(pass_names, with_kwargs=True)
            for _, module in top_level_modules(self.get_base_model())
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ----------------------------------------------------------------------------------------- adapters
    @property
    def active_peft_config(self) -> AdapterConfig:
        return self.peft_config[self._active_adapters[0]]

    @property
    def modules_to_save(self) -> set[str] | None:
        names = {name for config in self.peft_config.values() for name in config.modules_to_save or []}
        return names or None

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """The adapted layers by module name (in the wrapped model)."""
        for name, module in top_level_modules(self.get_base_model()):
            if isinstance(module, AdapterLayer):
                yield name, module

    def modules_to_save_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        """The ``modules_to_save`` wrappers by module name (in the wrapped model)."""
        for name, module in top_level_modules(self.get_base_model()):
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig) -> None:
        """Add an adapter (inactive unless it is the first; activate it with :meth:`set_adapter`)."""
        config = as_orthotune_config(peft_config)
        self._check_new_adapter(adapter_name, config)
        self._commit(plan_adapter(self.get_base_model(), adapter_name, config))

    def _check_new_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE_ADAPTER_NAME:
            raise ValueError(f"adapter_name={adapter_name!r} must be a non-empty name other than {BASE_ADAPTER_NAME!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter_name={adapter_name!r} already exists; delete_adapter() it or pick another name")
        types = {existing.peft_type for existing in self.peft_config.values()}
        if types and config.peft_type not in types:
            raise ValueError(
                f"cannot add a {config.peft_type} adapter to a model with {sorted(types)} adapters (peft cannot "
                "either); use one method per model"
            )

    def _commit(self, plan: AdapterPlan) -> None:
        """Put a checked plan into the model and make its adapter known (cannot fail on a planned adapter)."""
        model = self.get_base_model()
        first = not self.peft_config
        commit_plan(model, plan)
        self.peft_config[plan.adapter_name] = plan.config
        if first:
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            self._active_adapters = [plan.adapter_name]
        self._apply_active_adapters()

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool | None = None) -> None:
        """Make ``adapter_name`` (or several, applied in order) the active adapters; only they train.

        Args:
            inference_mode: freeze them; by default as their configs say (``True`` after loading without
                ``is_trainable``).
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown or not names:
            raise ValueError(f"adapter_name={adapter_name!r}: this model has adapters {list(self.peft_config)}")
        self._active_adapters = names
        self._apply_active_adapters(inference_mode)

    def _apply_active_adapters(self, inference_mode: bool | None = None) -> None:
        active = self._active_adapters
        if inference_mode is None:
            inference_mode = all(self.peft_config[name].inference_mode for name in active)
        for _, layer in self.adapter_layers():
            layer.set_adapter([name for name in active if name in layer.adapter_names], inference_mode=inference_mode)
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.set_adapter(active, inference_mode=inference_mode)
        if inference_mode:
            return
        for name in active:
            for _, bias in self.trained_biases(self.peft_config[name].bias, name).items():
                bias.requires_grad_(True)

    def trained_biases(self, bias: str, adapter_name: str) -> dict[str, torch.Tensor]:
        """Model names of the biases that train (and are saved) with ``bias="all"`` or ``"<method>_only"``."""
        if bias == "all":
            return {
                name: parameter
                for name, parameter in self.get_base_model().named_parameters()
                if name.rpartition(".")[2] == "bias"
                and ".modules_to_save." not in f".{name}"
                and ".original_module." not in f".{name}"
            }
        if bias == "none":
            return {}
        biases = {}
        for name, layer in self.adapter_layers():
            base_bias = getattr(layer.get_base_layer(), "bias", None)
            if adapter_name in layer.adapter_names and isinstance(base_bias, torch.Tensor):
                biases[f"{name}.base_layer.bias"] = base_bias
        return biases

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; it must not be merged."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name={adapter_name!r}: this model has adapters {list(self.peft_config)}")
        merged = [name for name, layer in self.adapter_layers() if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(f"adapter {adapter_name!r} is merged into {merged[:3]}; call unmerge_adapter() first")
        for _, layer in self.adapter_layers():
            if adapter_name in layer.adapter_names:
                layer.delete_adapter(adapter_name)
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [name for name in self._active_adapters if name != adapter_name]
        self._active_adapters = remaining or list(self.peft_config)[:1]
        self._apply_active_adapters()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model is the base model (merged adapters are unmerged first)."""
        trainable = {parameter: parameter.requires_grad for parameter in self.parameters()}
        for _, layer in self.adapter_layers():
            layer.enable_adapters(False)
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.disable_adapters = True
        try:
            yield
        finally:
            for _, layer in self.adapter_layers():
                layer.enable_adapters(True)
            for _, wrapper in self.modules_to_save_wrappers():
                wrapper.disable_adapters = False
            for parameter, requires_grad in trainable.items():
                parameter.requires_grad_(requires_grad)

    # ----------------------------------------------------------------------------------------- counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, each shared parameter counted once."""
        trainable = total = 0
        for parameter in self.parameters():
            total += parameter.numel()
            trainable += parameter.numel() if parameter.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        percent = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")

    # ------------------------------------------------------------------------------------------ merging
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters into the base weights (default: the active ones, in order)."""
        self.merge_layers(adapter_names, safe_merge)

    def merge_layers(
        self,
        adapter_names: Sequence[str] | None,
        safe_merge: bool,
        around: Callable[[AdapterLayer], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        """:meth:`merge_adapter` layer by layer, each inside ``around(layer)``: the hook for distributed wrappers,
        which gather a layer's parameters there (see :mod:`orthotune.integrations.distributed`)."""
        around = around or (lambda layer: contextlib.nullcontext())
        names = None if adapter_names is None else list(adapter_names)
        unknown = [name for name in names or [] if name not in self.peft_config]
        if unknown:
            raise ValueError(f"adapter_names={unknown}: this model has adapters {list(self.peft_config)}")
        to_merge = []
        for name, layer in self.adapter_layers():
            wanted = layer.active_adapters if names is None else [a for a in names if a in layer.adapter_names]
            if wanted:
                to_merge.append((name, layer, wanted))
        self._check_untied([(name, layer) for name, layer, _ in to_merge])
        for _, layer, wanted in to_merge:
            with around(layer):
                layer.merge(safe_merge=safe_merge, adapter_names=wanted)

    def _check_untied(self, layers: list[tuple[str, AdapterLayer]]) -> None:
        """Refuse to merge into a weight that another module shares (tied input and output embeddings)."""
        users: dict[int, list[str]] = {}
        for name, parameter in self.get_base_model().named_parameters(remove_duplicate=False):
            users.setdefault(id(parameter), []).append(name)
        for name, layer in layers:
            weight = getattr(layer.get_base_layer(), "weight", None)
            others = [other for other in users.get(id(weight), []) if not other.startswith(f"{name}.base_layer.")]
            if others:
                raise ValueError(
                    f"cannot merge into {name!r}: its weight is tied to {others[0]!r}, which merging would change "
                    "as well; keep the adapter unmerged, or untie the weights first"
                )

    def unmerge_adapter(self) -> None:
        """Undo every merge, giving back the original base weights."""
        for _, layer in self.adapter_layers():
            if layer.merged:
                layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """Merge the adapters and return the plain model: the same outputs, no adapter layers left.

        ``modules_to_save`` modules become the active adapter's trained copy.
        """
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unload(keep_trained_copies=True)

    def unload(self) -> nn.Module:
        """Remove every adapter (unmerging first) and return the original model."""
        self.unmerge_adapter()
        return self._unload(keep_trained_copies=False)

    def _unload(self, keep_trained_copies: bool) -> nn.Module:
        model = self.get_base_model()
        for name, module in list(top_level_modules(model)):
            if isinstance(module, AdapterLayer):
                model.set_submodule(name, module.get_base_layer())
            elif isinstance(module, ModulesToSaveWrapper):
                model.set_submodule(name, module.active_module if keep_trained_copies else module.original_module)
        self.peft_config.clear()
        self._active_adapters = []
        return model

    # ------------------------------------------------------------------------------------- saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as peft does: ``default`` into ``save_directory``, others into subdirectories.

        Args:
            safe_serialization: must be ``True``; orthotune writes safetensors only.
            selected_adapters: adapters to save (default: all).
            save_embedding_layers: also save the base weights of targeted embedding layers; ``"auto"`` does so
                when ``target_modules`` names ``embed_tokens`` or ``lm_head``, as peft does.
            is_main_process: only the main process writes (distributed training).
            state_dict: the model's state dict to take values from (e.g. gathered by a distributed wrapper).
        """
        save_model_adapters(
            self,
            save_directory,
            safe_serialization=safe_serialization,
            selected_adapters=selected_adapters,
            save_embedding_layers=save_embedding_layers,
            is_main_process=is_main_process,
            state_dict=state_dict,
        )

    # ------------------------------------------------------------------------------------- loading
    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: AdapterConfig | None = None,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Load an adapter directory (written by orthotune or peft) as a new adapter ``adapter_name``.

        Everything is checked before the model is touched: on any error the model is exactly as before.

        Args:
            model_id: a local directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
            is_trainable: ``False`` (default) freezes the adapter and puts the model in eval mode, as peft.
            config: use this config instead of the directory's.
            subfolder: a subdirectory of ``model_id``.
        """
        directory = os.path.join(model_id, subfolder) if subfolder else os.fspath(model_id)
        file = read_adapter_files(directory)
        if config is not None:
            config = as_orthotune_config(config)
            file.tensors = to_peft_convention(config, to_peft_convention(file.config, file.tensors))
            file.config = copy.deepcopy(config)
        file.config.inference_mode = not is_trainable
        self._check_new_adapter(adapter_name, file.config)
        plan = plan_adapter(self.get_base_model(), adapter_name, file.config)
        if file.legacy_oft is not None:
            convert_legacy_oft(file, plan.layers)
        required = plan.adapter_tensors()
        optional = optional_file_tensors(self, plan.layers, plan.config)
        check_tensors(file, required, optional)
        copy_tensors(file, required)  # into the plan's own tensors: the model is not touched yet
        self._commit(plan)
        copy_tensors(file, optional)
        if not is_trainable:
            self.eval()

    def load_adapter_weights(self, model_id: str | os.PathLike[str], adapter_name: str | None = None) -> None:
        """Overwrite an existing adapter's weights from a directory (resuming training), checked first."""
        adapter_name = adapter_name or self._active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name={adapter_name!r}: this model has adapters {list(self.peft_config)}")
        file = read_adapter_files(model_id)
        if file.config.peft_type != self.peft_config[adapter_name].peft_type or file.legacy_oft is not None:
            raise ValueError(f"{model_id} holds a {file.config.peft_type} adapter, not one like {adapter_name!r}")
        file.tensors = to_peft_convention(self.peft_config[adapter_name], to_peft_convention(file.config, file.tensors))
        required = own_file_tensors(self, adapter_name)
        optional = adapter_file_tensors(self, adapter_name, save_embedding_layers=True)
        check_tensors(file, required, optional)
        copy_tensors(file, optional)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: AdapterConfig | None = None,
        **kwargs: Any,
    ) -> OrthoModel:
        """Wrap ``model`` and load the adapter in ``model_id`` (see :meth:`load_adapter`).

        As in peft, the adapter layers go into ``model`` itself: a pipeline component stays what it was, so
        ``PeftModel.from_pretrained(pipe.unet, path)`` is all a diffusers pipeline needs; keep the returned
        wrapper to merge (``merge_and_unload()`` returns that same, now plain, ``pipe.unet``), unload or save.
        """
        wrapped = cls(model)
        wrapped.load_adapter(model_id, adapter_name, is_trainable=is_trainable, config=config, **kwargs)
        return wrapped


#: peft's name for the wrapper class.
PeftModel = OrthoModel


def get_peft_model(
    model: nn.Module,
    peft_config: AdapterConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> OrthoModel:
    """Wrap ``model`` and add the adapter ``adapter_name`` described by ``peft_config`` (peft's entry point).

    ``autocast_adapter_dtype`` and ``low_cpu_mem_usage`` are accepted for peft's sake: adapter parameters are
    always float32 and small. ``revision`` is recorded in the config.

    Example:
        >>> model = get_peft_model(model, OFTConfig(r=8, target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
        >>> model.print_trainable_parameters()  # doctest: +SKIP
    """
    if mixed:
        raise NotImplementedError("mixed=True (adapters of different methods in one model) is not supported")
    config = as_orthotune_config(peft_config)
    if revision is not None:
        config = copy.deepcopy(config)
        config.revision = revision
    return OrthoModel(model, config, adapter_name)
