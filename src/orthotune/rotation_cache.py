"""Reuse an adapter's rotation blocks at inference instead of rebuilding them on every call.

Building the blocks (skew unpacking, a Cayley solve or series) costs a fixed few hundred microseconds per layer
and call, which in token-by-token generation of a small model is most of the adapter's cost. When no gradient
is wanted the blocks are a pure function of the adapter's tensors and settings, so they are kept and reused
until one of those changes.

A kept entry is used only when all of these still hold:

* every source tensor is the same object (a weak reference, so a replaced parameter never matches), at the
  same storage address (``.data`` swapped, moved to another device) and at the same ``_version`` (any in-place
  write through autograd's view of it: an optimizer step, ``copy_`` from ``load_state_dict``, ``nn.init``);
* the caller's ``settings`` tuple is equal (the layer's train/eval mode, the adapter's options, its scale);
* gradients are off for the sources (``torch.no_grad()``, or adapters that do not require grad), and the
  entry was built in the same ``torch.inference_mode`` state (inference tensors cannot be saved for backward).

Not seen: writes through ``tensor.data`` (``p.data.copy_(...)``), which autograd's version counter does not
count. Code that writes parameters that way must call :meth:`RotationCache.clear` afterwards
(``AdapterLayer.clear_rotation_cache``). A new adapter under an old name has new parameter objects, and
``delete_adapter`` drops the adapter's entry. Nothing is cached while ``torch.compile`` traces (the compiled
graph has its own reuse rules). A strength (``set_scale``) is part of ``settings``, as are the adapter's other options.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch


def _fingerprint(tensor: torch.Tensor) -> tuple[weakref.ref, int, int] | None:
    try:
        return weakref.ref(tensor), tensor._version, tensor.data_ptr()
    except (RuntimeError, TypeError):  # inference tensors have no version counter; some subclasses no data_ptr
        return None


def _still(fingerprint: tuple[weakref.ref, int, int], tensor: torch.Tensor) -> bool:
    reference, version, address = fingerprint
    return reference() is tensor and tensor._version == version and tensor.data_ptr() == address


class RotationCache:
    """Rotation blocks per adapter name, reused while their sources and settings are unchanged."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[list[tuple[weakref.ref, int, int]], Hashable, torch.Tensor]] = {}
        #: Builds performed through :meth:`get` (for tests and benchmarks).
        self.builds = 0

    def get(
        self,
        name: str,
        build: Callable[[], torch.Tensor],
        sources: Sequence[torch.Tensor],
        settings: Hashable = (),
    ) -> torch.Tensor:
        """``build()``, or the blocks it returned before for ``name`` if nothing they depend on has changed.

        Args:
            name: the adapter's name.
            build: makes the blocks from ``sources``.
            sources: every tensor ``build`` reads (the adapter's parameters).
            settings: everything else ``build``'s result depends on, hashable and comparable.
        """
        if torch.is_grad_enabled():
            for source in sources:
                if source.requires_grad:
                    self._entries.pop(name, None)  # training: no later no-grad call may see blocks older than this
                    return build()
        if torch.compiler.is_compiling():
            return build()
        key = (settings, torch.is_inference_mode_enabled())
        entry = self._entries.get(name)
        if entry is not None and entry[1] == key:
            fingerprints = entry[0]
            if len(fingerprints) == len(sources):
                for fingerprint, source in zip(fingerprints, sources, strict=True):
                    if not _still(fingerprint, source):
                        break
                else:
                    return entry[2]
        blocks = build()
        self.builds += 1
        fingerprints = [f for f in map(_fingerprint, sources) if f is not None]
        if len(fingerprints) == len(sources):
            self._entries[name] = (fingerprints, key, blocks.detach())
        else:  # a source without a version counter or address cannot be watched: do not keep
            self._entries.pop(name, None)
        return blocks

    def clear(self, name: str | None = None) -> None:
        """Forget ``name``'s blocks, or every adapter's."""
        if name is None:
            self._entries.clear()
        else:
            self._entries.pop(name, None)

    def __len__(self) -> int:
        return len(self._entries)

    # Copies and pickles of a layer start with an empty cache: weak references neither copy nor pickle, and
    # the kept blocks would be rebuilt from the copy's own parameters anyway.
    def __deepcopy__(self, memo: dict[int, Any]) -> RotationCache:
        return RotationCache()

    def __getstate__(self) -> dict[str, Any]:
        return {"builds": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._entries = {}
        self.builds = state.get("builds", 0)
