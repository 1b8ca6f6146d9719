"""adc: adversarial diffusion compression for SD-based real-world super-resolution.

The public calls, one import away::

    from compress import analyse, unet_facts, remove_conditioning, prune_channels, ChannelPruneConfig
    from compress import save_pretrained, from_pretrained, unet_config

Names load on first use (PEP 562 ``__getattr__``): ``import compress`` imports neither torch nor
diffusers, so the command line starts at once and ``--help`` costs nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# public name -> (module, attribute there)
_EXPORTS: dict[str, tuple[str, str]] = {}
for _module, _names in {
    "compress.analysis": ("analyse", "unet_facts", "TaskFacts", "Analysis", "Plan", "write_report"),
    "compress.prune": ("remove_conditioning", "remove_modules", "fold_timestep", "fold_cross_attention",
                       "widen_module", "widen_conv", "presliced_width", "slice_width", "SliceConfig",
                       "prune_channels", "ChannelPruneConfig", "apply_history", "TransformRecord", "ModuleSpec",
                       "save_pretrained", "from_pretrained", "load_records", "save_compressed", "load_compressed",
                       "base_model", "base_record", "base_record_of", "replay"),
    "compress.zoo.sd": ("unet_config", "vae_config", "build_unet", "build_vae"),
    "compress.student": ("unet_part", "decoder_part", "compose_student", "save_student", "load_student"),
    "compress.families": ("ModelFamily",),
    "compress.inference": ("upscale", "upscale_to_png"),
    "compress.sr": ("load_sr_model",),
    "compress.deploy": ("export_model", "load_exported", "read_export_record"),
    "compress.errors": ("AdcError",),
}.items():
    _EXPORTS.update({name: (_module, name) for name in _names})
# the family registry, named for a flat namespace (compress.families has them as register, get, ...)
_EXPORTS.update({"register_family": ("compress.families", "register"), "get_family": ("compress.families", "get"),
                 "available_families": ("compress.families", "available"),
                 "build_model": ("compress.families", "build")})
del _module, _names

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'compress' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # loaded once; later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see; tests/test_quickstart.py keeps it equal to _EXPORTS
    from .analysis import Analysis, Plan, TaskFacts, analyse, unet_facts, write_report
    from .deploy import export_model, load_exported, read_export_record
    from .errors import AdcError
    from .families import ModelFamily
    from .families import available as available_families
    from .families import build as build_model
    from .families import get as get_family
    from .families import register as register_family
    from .inference import upscale, upscale_to_png
    from .prune import (ChannelPruneConfig, ModuleSpec, SliceConfig, TransformRecord, apply_history, base_model,
                        base_record, base_record_of, fold_cross_attention, fold_timestep, from_pretrained,
                        load_compressed, load_records, presliced_width, prune_channels, remove_conditioning,
                        remove_modules, replay, save_compressed, save_pretrained, slice_width, widen_conv,
                        widen_module)
    from .sr import load_sr_model
    from .student import compose_student, decoder_part, load_student, save_student, unet_part
    from .zoo.sd import build_unet, build_vae, unet_config, vae_config
