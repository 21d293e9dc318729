"""Whole models: find the layers to adapt, wrap them in OFT/BOFT/HRA layers, and give peft's model API.

    get_peft_model(model, OFTConfig(r=8, target_modules=["q_proj", "v_proj"]))
      └─ OrthoModel                                  (peft's PeftModel: add, load, save, forward)
           └─ base_model: OrthoTuner                 (peft's tuner: configs, active set, merging; see tuner.py)
                └─ model: the user's model, each target replaced in place:
                     q_proj ─► oft.Linear(base_layer=q_proj, oft_R={"default": …})

The structure, and with it every state-dict key, is peft's: ``base_model.model.<path>.base_layer.weight``,
``base_model.model.<path>.oft_R.<adapter>.weight``. This module owns the adapter lifecycle only: which modules
are adapted is :mod:`orthotune.targeting`'s question, how an adapter is laid out in files
:mod:`orthotune.checkpoint`'s, what is done to all layers at once (activate, merge, unload)
:mod:`orthotune.tuner`'s, and what a layer computes its method's module's.

Nothing of the model changes until an adapter is known to fit: layers are built beside the model first
(they only reference the base layers), loaded files are checked against them, and only then are they put in.

This module imports neither transformers nor peft; transformers models are handled through their methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from orthotune.adapter_layer import BASE_ADAPTER_NAME, AdapterLayer
from orthotune.adapter_loading import load_into_adapter, load_new_adapter
from orthotune.checkpoint import (
    read_adapter_files,
    remap_keys,
    save_model_adapters,
)
from orthotune.composition import add_weighted_adapter
from orthotune.config import AdapterConfig, PeftType, as_orthotune_config
from orthotune.injection import AdapterPlan, commit_plan, plan_adapter
from orthotune.model_card import update_model_card
from orthotune.modules_to_save import ModulesToSaveWrapper
from orthotune.single_file import load_model_file, save_model_file
from orthotune.tuner import ForwardsAttributes, OrthoTuner

__all__ = ["OrthoModel", "OrthoTuner", "PeftModel", "get_peft_model"]


# ----------------------------------------------------------------------------------------------- the model
class OrthoModel(ForwardsAttributes):
    """A model with named OFT/BOFT/HRA adapters and peft's ``PeftModel`` API (also exported as ``PeftModel``).

    Calls and attributes not defined here go to ``base_model`` (the :class:`~orthotune.tuner.OrthoTuner`, peft's
    tuner) and from there to the wrapped model (``model.config``, ``generate``, ``gradient_checkpointing_enable``,
    …). Build one with :func:`get_peft_model` or :meth:`from_pretrained`.

    Args:
        model: the model to adapt (modified in place when an adapter is added).
        peft_config: the first adapter's config, or ``None`` to start without adapters.
        adapter_name: the first adapter's name.
        autocast_adapter_dtype, low_cpu_mem_usage: as in :meth:`add_adapter`.
    """

    _inner = "base_model"

    def __init__(
        self,
        model: nn.Module,
        peft_config: AdapterConfig | None = None,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
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
        # The forward signature is the wrapped model's, so that tools that inspect it (transformers' Trainer
        # keeps only the batch columns forward accepts) see input_ids, labels, … and not *args, **kwargs.
        forward = functools.partial(type(self).forward, self)
        with contextlib.suppress(TypeError, ValueError):
            forward.__signature__ = inspect.signature(model.forward)  # type: ignore[attr-defined]
        self.forward = forward  # type: ignore[method-assign]
        if peft_config is not None:
            self.add_adapter(
                adapter_name,
                peft_config,
                low_cpu_mem_usage=low_cpu_mem_usage,
                autocast_adapter_dtype=autocast_adapter_dtype,
            )

    # ---------------------------------------------------------------------------- state (in the tuner)
    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        """Adapter name → config; the same dict as ``base_model.peft_config``."""
        return self.base_model.peft_config

    @peft_config.setter
    def peft_config(self, value: dict[str, AdapterConfig]) -> None:
        self.base_model.peft_config = value

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several are active)."""
        return self.base_model.active_adapter

    @property
    def peft_type(self) -> PeftType | None:
        """The method of this model's adapters (one per model, as in peft); ``None`` without adapters."""
        types = [config.peft_type for config in self.peft_config.values()]
        return PeftType(types[0]) if types else None

    # ------------------------------------------------------------------------------------- pass-through
    def get_base_model(self) -> nn.Module:
        """The wrapped model itself, with its adapted layers in place."""
        return self.base_model.model

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward; ``adapter_names`` (inference only) gives each sample its own adapter,
        ``"__base__"`` for none."""
        with self.base_model.per_sample_adapters(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``, with ``adapter_names`` as in :meth:`forward`."""
        with self.base_model.per_sample_adapters(adapter_names):
            generate: Any = self.get_base_model().generate
            return generate(*args, **kwargs)

    # ----------------------------------------------------------------------------------------- adapters
    @property
    def active_peft_config(self) -> AdapterConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def modules_to_save(self) -> set[str] | None:
        names = {name for config in self.peft_config.values() for name in config.modules_to_save or []}
        return names or None

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """The adapted layers by module name (in the wrapped model)."""
        return self.base_model.adapter_layers()

    def modules_to_save_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        """The ``modules_to_save`` wrappers by module name (in the wrapped model)."""
        return self.base_model.modules_to_save_wrappers()

    def trained_biases(self, bias: str, adapter_name: str) -> dict[str, torch.Tensor]:
        """Model names of the biases that train (and are saved) with ``bias="all"`` or ``"<method>_only"``."""
        return self.base_model.trained_biases(bias, adapter_name)

    # ----------------------------------------------------------------------------------------- adding
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: AdapterConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
        *,
        module_names: Collection[str] | None = None,
    ) -> None:
        """Add an adapter (inactive unless it is the first; activate it with :meth:`set_adapter`).

        ``peft_config`` itself becomes ``peft_config[adapter_name]``, its defaults resolved for this model
        (``target_modules``, the task's heads), as in peft. Parameters already in the model keep their
        ``requires_grad``; the new adapter trains only when it is the first (active) one.

        Args:
            low_cpu_mem_usage: create the adapter's tensors on the meta device, without values: for an adapter
                whose weights are loaded next (:meth:`load_adapter` or ``set_peft_model_state_dict`` with the same
                name); using it before that is an error.
            autocast_adapter_dtype: accepted for peft's sake; adapter parameters are always float32 (peft's
                behaviour with ``True``).
            module_names: adapt the modules of these names (in the wrapped model) instead of the config's
                targets (``inject_adapter_in_model(state_dict=...)``).
        """
        _check_float32(autocast_adapter_dtype)
        config = as_orthotune_config(peft_config)
        self.check_new_adapter(adapter_name, config)
        self.add_planned_adapter(plan_adapter(self.get_base_model(), adapter_name, config, module_names), config)
        if low_cpu_mem_usage:
            for _, layer in self.adapter_layers():
                if adapter_name in layer.adapter_names:
                    layer.adapter_to_meta(adapter_name)

    def check_new_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
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
        biased = [name for name, existing in self.peft_config.items() if existing.bias != "none"]
        if config.bias != "none" and biased:
            raise ValueError(
                f"{type(self).__name__} supports only 1 adapter with bias (as peft): adapter {biased[0]!r} has "
                f"bias={self.peft_config[biased[0]].bias!r}, and adapter {adapter_name!r} with bias={config.bias!r} "
                "would train and save the same base biases; set bias='none' for all adapters but one"
            )

    def add_planned_adapter(self, plan: AdapterPlan, config: AdapterConfig | None = None) -> None:
        """Put a checked plan into the model and make its adapter known as ``config`` (default: the plan's; cannot
        fail on a planned adapter). Parameters already in the model keep their ``requires_grad`` (peft's rule)."""
        config = plan.config if config is None else config
        model = self.get_base_model()
        first = not self.peft_config
        before = {} if first else {parameter: parameter.requires_grad for parameter in model.parameters()}
        commit_plan(model, plan)
        if config is not plan.config:  # peft resolves the user's config in place; the plan resolved a copy
            for item in dataclasses.fields(config):
                setattr(config, item.name, getattr(plan.config, item.name))
        self.peft_config[plan.adapter_name] = config
        if first:
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            self.base_model.set_adapter(plan.adapter_name)
        else:
            self.base_model.apply_active_adapters()
        for parameter, requires_grad in before.items():
            parameter.requires_grad_(requires_grad)

    # ------------------------------------------------------------------------------- peft's tuner calls
    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool | None = None) -> None:
        """Make ``adapter_name`` (or several, applied in order) the active adapters; only they train.

        Args:
            inference_mode: freeze them; by default as their configs say (``True`` after loading without
                ``is_trainable``).
        """
        self.base_model.set_adapter(adapter_name, inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters on or off, leaving the others as they are."""
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; it must not be merged."""
        self.base_model.delete_adapter(adapter_name)

    def disable_adapter_layers(self) -> None:
        """Turn every adapter off in place (see :meth:`OrthoTuner.disable_adapter_layers`)."""
        self.base_model.disable_adapter_layers()

    def enable_adapter_layers(self) -> None:
        """Turn the adapters on again in place (see :meth:`OrthoTuner.enable_adapter_layers`)."""
        self.base_model.enable_adapter_layers()

    # ----------------------------------------------------------------------------------------- strength
    def set_scale(self, adapter_name: str, scale: float) -> None:
        """Apply ``adapter_name`` at strength ``scale`` in every layer it adapts: its rotations become ``R(t·Q)``.

        0 gives the base model, 1 the trained adapter, -1 its inverse rotation (for BOFT with one butterfly
        factor; with more, the product of the inverse factors in the same order), 2 twice as far along the
        Cayley curve ``t ↦ R(t·Q)``; see :mod:`orthotune.functional.strength`. BOFT's output scale becomes
        ``s^t``. Forward and merge both use the strength; a merged adapter must be unmerged first.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name={adapter_name!r}: this model has adapters {list(self.peft_config)}")
        layers = [layer for _, layer in self.adapter_layers() if adapter_name in layer.adapter_names]
        for layer in layers:  # every layer accepts the value before any changes
            layer.check_strength(adapter_name, scale)
        for layer in layers:
            layer.set_scale(adapter_name, scale)

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
        """Add ``adapter_name``: one adapter equal to ``adapters`` active together, each at its weight as strength.

        The new adapter gives the outputs of ``set_adapter(adapters)`` with each adapter's strength multiplied by
        its weight (as peft's LoRA ``add_weighted_adapter`` folds in ``scaling``). Per layer, the sources' exact
        rotations ``R(w·t·Q)`` are multiplied block by block in the order the layer applies them, and the
        product's generator is its inverse Cayley transform (:func:`~orthotune.functional.cayley_inverse`): an
        exact, not an averaged, composition. The new adapter is in exact Cayley mode without COFT (sources in
        Cayley-Neumann mode contribute the exact rotations their parameters stand for; the result generally
        lies outside a COFT ball), has strength 1, is not activated, and takes its ``modules_to_save`` copies
        from the one source that has one (two sources with their own copy are refused, as ``set_adapter`` refuses them).

        Args:
            adapters: existing adapters, in ``set_adapter`` order (the first sits next to the base layer).
            weights: one finite strength multiplier per adapter (negative inverts that adapter's rotation).
            adapter_name: the new adapter's name.

        Raises:
            ValueError: for unknown adapters or bad weights; if in some layer the sources differ in block size,
                block count or butterfly factors (naming the layer and what differs); for several BOFT sources
                with more than one butterfly factor (not exactly composable); or if a product turns some plane
                by 180°. Nothing is added then.
        """
        add_weighted_adapter(self, adapters, weights, adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model is the base model (merged adapters are unmerged first).

        On exit the adapter layers are on again unless they were all off before, and every parameter trains as
        it did before (peft also restores a previous all-off state, but leaves loaded adapters trainable).
        """
        enabled = self.base_model.layers_enabled()
        if enabled == "irregular":
            warnings.warn(
                "The model contains some adapter layers that are enabled and others that are disabled. This is most "
                "likely unintentional. After exiting the disable_adapter context, all adapters will be enabled",
                stacklevel=3,
            )
        trainable = {parameter: parameter.requires_grad for parameter in self.parameters()}
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            if enabled is not False:
                self.base_model.enable_adapter_layers()
            for parameter, requires_grad in trainable.items():
                parameter.requires_grad_(requires_grad)

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters into the base weights (default: the active ones, in order)."""
        self.base_model.merge_adapter(adapter_names, safe_merge)

    def merge_layers(
        self,
        adapter_names: Sequence[str] | None,
        safe_merge: bool,
        around: Callable[[AdapterLayer], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        """:meth:`merge_adapter` with a context around each layer (see :meth:`OrthoTuner.merge_layers`)."""
        self.base_model.merge_layers(adapter_names, safe_merge, around)

    def unmerge_adapter(self) -> None:
        """Undo every merge, giving back the original base weights."""
        self.base_model.unmerge_adapter()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """Merge the adapters and return the plain model: the same outputs, no adapter layers left.

        ``modules_to_save`` modules become the active adapter's trained copy.
        """
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter (unmerging first) and return the original model."""
        return self.base_model.unload()

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
        """Write each adapter as peft does: ``default`` into ``save_directory``, others into subdirectories, and a
        ``README.md`` model card (an existing card is updated, not replaced).

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

    def save_file(
        self,
        path: str | os.PathLike[str],
        format: str = "lycoris",
        adapter_name: str | None = None,
        prefixes: Mapping[str, str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Write one adapter as a single ``.safetensors`` file of another tool (e.g. LyCORIS's, for an output-side
        adapter), atomically; see :func:`orthotune.single_file.save_model_file` for the arguments."""
        save_model_file(self, path, format, adapter_name, prefixes, dtype)

    def create_or_update_model_card(self, output_dir: str | os.PathLike[str]) -> None:
        """Write ``README.md`` in ``output_dir`` for these adapters, or update the one there (as peft)."""
        update_model_card(output_dir, self)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Save the adapters to a temporary directory and upload it to the Hugging Face Hub repo ``repo_id``.

        Needs ``huggingface_hub`` and a network; the arguments are transformers' ``push_to_hub``'s (see
        :func:`orthotune.integrations.hub.push_to_hub`). Returns the commit information.
        """
        from orthotune.integrations.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    # ------------------------------------------------------------------------------------- loading
    def load_file(
        self,
        path: str | os.PathLike[str],
        adapter_name: str = "default",
        prefixes: Mapping[str, str] | None = None,
        ignore_unmatched: bool = False,
        is_trainable: bool = False,
    ) -> None:
        """Load a single-file adapter (LyCORIS, …; its format detected) as ``adapter_name``, checked before the
        model is touched; see :func:`orthotune.single_file.load_model_file` for the arguments."""
        load_model_file(self, path, adapter_name, prefixes, ignore_unmatched, is_trainable)

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        *,
        config: AdapterConfig | None = None,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> _IncompatibleKeys:
        """Load an adapter directory (written by orthotune or peft) as adapter ``adapter_name``.

        A new name adds the adapter (inactive unless it is the first); an existing one gets the file's weights,
        as in peft (this also fills an adapter created with ``low_cpu_mem_usage=True``). Everything is checked
        before the model is touched: a file that does not fit, with missing or unexpected keys, is refused and the
        model is exactly as before.

        Args:
            model_id: a local directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
            is_trainable: ``False`` (default) freezes a new adapter and puts the model in eval mode, as peft;
                ``True`` makes a new adapter's parameters trainable even while it is not active, as peft.
            torch_device, ephemeral_gpu_offload, low_cpu_mem_usage: accepted for peft's sake; the weights are
                read to the CPU and copied beside each base layer.
            autocast_adapter_dtype: as in :meth:`add_adapter`.
            key_mapping: peft's regex renames of file keys (after ``base_model.model.``), first match wins.
            config: use this config instead of the directory's (it becomes ``peft_config[adapter_name]``).
            subfolder: a subdirectory of ``model_id``.

        Returns:
            peft's load result: ``missing_keys`` and ``unexpected_keys`` of the adapter (empty: a file with either
            is refused).
        """
        _check_float32(autocast_adapter_dtype)
        directory = os.path.join(model_id, subfolder) if subfolder else os.fspath(model_id)
        file = read_adapter_files(directory)
        file.tensors = remap_keys(file.tensors, key_mapping)
        if adapter_name in self.peft_config:
            load_into_adapter(self, adapter_name, file)
        else:
            load_new_adapter(self, adapter_name, file, config, is_trainable)
        if not is_trainable:
            self.eval()
        return _IncompatibleKeys(missing_keys=[], unexpected_keys=[])

    def load_adapter_weights(self, model_id: str | os.PathLike[str], adapter_name: str | None = None) -> None:
        """Overwrite an existing adapter's weights from a directory (resuming training), checked first."""
        adapter_name = adapter_name or self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name={adapter_name!r}: this model has adapters {list(self.peft_config)}")
        load_into_adapter(self, adapter_name, read_adapter_files(model_id))

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: AdapterConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> OrthoModel:
        """Wrap ``model`` and load the adapter in ``model_id`` (see :meth:`load_adapter`).

        As in peft, the adapter layers go into ``model`` itself: a pipeline component stays what it was, so
        ``PeftModel.from_pretrained(pipe.unet, path)`` is all a diffusers pipeline needs; keep the returned
        wrapper to merge (``merge_and_unload()`` returns that same, now plain, ``pipe.unet``), unload or save.
        A ``config`` passed here becomes ``peft_config[adapter_name]`` itself, as in peft. Without
        ``key_mapping``, the model's own ``_checkpoint_conversion_mapping`` (transformers) is applied, as peft does.
        """
        if key_mapping is None:
            key_mapping = getattr(model, "_checkpoint_conversion_mapping", None) or None
        wrapped = cls(model)
        wrapped.load_adapter(
            model_id,
            adapter_name,
            is_trainable=is_trainable,
            autocast_adapter_dtype=autocast_adapter_dtype,
            ephemeral_gpu_offload=ephemeral_gpu_offload,
            low_cpu_mem_usage=low_cpu_mem_usage,
            key_mapping=key_mapping,
            config=config,
            **kwargs,
        )
        return wrapped


def _check_float32(autocast_adapter_dtype: bool) -> None:
    if not autocast_adapter_dtype:
        warnings.warn(
            "autocast_adapter_dtype=False: orthotune keeps adapter parameters in float32 whatever the base model's "
            "dtype (rotations are built in float32 and cast to the activations' dtype; see docs/math.md)",
            stacklevel=3,
        )


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

    ``peft_config`` itself becomes the model's config of the adapter, as in peft; ``revision`` is recorded in it.
    ``low_cpu_mem_usage`` creates the adapter on the meta device (see :meth:`OrthoModel.add_adapter`).

    Example:
        >>> model = get_peft_model(model, OFTConfig(r=8, target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
        >>> model.print_trainable_parameters()  # doctest: +SKIP
    """
    if mixed:
        raise NotImplementedError("mixed=True (adapters of different methods in one model) is not supported")
    config = as_orthotune_config(peft_config)
    if revision is not None:
        if config.revision is not None and config.revision != revision:
            warnings.warn(
                f"peft config has already set base model revision to {config.revision}, overwriting with revision "
                f"{revision}",
                stacklevel=2,
            )
        config.revision = revision
    return OrthoModel(
        model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage
    )
