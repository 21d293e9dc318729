"""Layer names of other tools' files, matched to a model's module names.

The trainers around Stable Diffusion name a layer by its module path with every ``.`` written as ``_``, after a
prefix that says which network it is in (``lora_unet_…``, ``oft_unet_…``). Some files keep the dots
(OneTrainer's internal and diffusers-style names). :func:`match_module_names` takes both: a name that is a module
name of the model is that module; any other name is flattened and matched as LyCORIS matches its names
(:func:`~orthotune.formats.lycoris.match_lycoris_names`, the one owner of that rule).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from orthotune.formats.lycoris import match_lycoris_names

logger = logging.getLogger(__name__)


def match_module_names(
    names: Iterable[str],
    module_names: Iterable[str],
    prefixes: Mapping[str, str],
    ignore_unmatched: bool = False,
    tool: str = "file",
) -> dict[str, str]:
    """Map a file's layer names onto a model's module names.

    Args:
        names: the file's layer names.
        module_names: the model's module names (``named_modules()``).
        prefixes: name prefix → module path its names are relative to (``""``: the model itself).
        ignore_unmatched: leave out names that match no module (logged) instead of failing.
        tool: the file's tool, for messages.

    Returns:
        ``{file name: module name}``.

    Raises:
        ValueError: names that match no module (listed), unless ``ignore_unmatched``.
    """
    modules = list(module_names)
    known = set(modules)
    matched: dict[str, str] = {}
    flattened: dict[str, str] = {}
    for name in dict.fromkeys(names):
        if name in known:
            matched[name] = name
        else:
            flattened[name.replace(".", "_")] = name
    found = match_lycoris_names(flattened, modules, prefixes, ignore_unmatched=True)
    matched.update({flattened[flat]: module for flat, module in found.items()})
    unmatched = [name for flat, name in flattened.items() if flat not in found]
    if unmatched:
        shown = ", ".join(unmatched[:20]) + (f", … ({len(unmatched)} in all)" if len(unmatched) > 20 else "")
        if not ignore_unmatched:
            raise ValueError(
                f"{tool} layers match no module of the model: {shown}. Known prefixes: {sorted(prefixes)}; pass "
                "prefixes= to place a prefix under a submodule (e.g. {'lora_unet': 'unet'}), or "
                "ignore_unmatched=True to skip them"
            )
        logger.info("skipping %d %s layers that match no module: %s", len(unmatched), tool, shown)
    return matched
