"""Model transformations, one call each, ModelOpt style: ``new_model, record = op(model, ...)``.

Every op edits a deep copy, so the caller's ``model`` still runs as before (``inplace=True``
edits it instead: for callers that own it and need the memory), and returns the new model plus a
:class:`TransformRecord` (JSON via ``record.to_dict()``: op, arguments, params before/after,
modules changed). Nothing here knows SD-2.1's block counts or AdcSR's 0.75: they are arguments
(``recipes/adcsr.yaml``).

- :func:`remove_modules`, :func:`remove_conditioning` (``remove.py``): drop/replace by name pattern.
- :func:`fold_timestep`, :func:`fold_cross_attention` (``fold.py``): constant branches into weights.
- :func:`widen_conv`, :func:`widen_module`, :func:`presliced_width` (``interface.py``): AdcSR's
  16-in ``conv_in`` / 342-out ``conv_out``.
- :func:`slice_width` (``slice.py``): AdcSR's layer-wise leading slice.
- :func:`prune_channels` (``channels.py``): dependency-aware pruning with torch-pruning.
- :func:`save_pretrained`, :func:`from_pretrained`, :func:`load_records` (``persist.py``): one
  call each, the records kept with the weights; :func:`save_compressed`, :func:`load_compressed`,
  :func:`base_model` take the chain with its base record.

AdcSR's UNet from SD 2.1 (the exact official initialisation; ``inplace=True`` would spare a
copy of the full UNet per step)::

    unet, r0 = base_model("compress.zoo.sd:build_unet", size="full")
    unet, r1 = remove_conditioning(unet)                      # ConditionFreeUNet
    unet, r2 = widen_module(unet, "conv_in", in_channels=presliced_width(12, 0.75))    # 16
    unet, r3 = widen_module(unet, "conv_out", out_channels=presliced_width(256, 0.75)) # 342
    unet, r4 = slice_width(unet, 0.75)                        # 12 -> 240 ... 240 -> 256
    save_compressed(unet, [r0, r1, r2, r3, r4], "runs/unet")
"""

from ._common import Constant, ModuleChange, ModuleSpec, TransformRecord, count_params
from .attention import ScaledSDPAProcessor
from .channels import ChannelPruneConfig, apply_history, prune_channels
from .fold import fold_cross_attention, fold_timestep
from .interface import presliced_width, widen_conv, widen_module
from .persist import (base_model, base_record, base_record_of, from_pretrained, load_compressed, load_records, replay,
                      save_compressed, save_pretrained)
from .remove import remove_conditioning, remove_modules
from .slice import SliceConfig, slice_width

__all__ = [
    "TransformRecord", "ModuleChange", "ModuleSpec", "Constant", "count_params", "ScaledSDPAProcessor",
    "remove_modules", "remove_conditioning", "fold_timestep", "fold_cross_attention",
    "widen_conv", "widen_module", "presliced_width", "slice_width", "SliceConfig",
    "ChannelPruneConfig", "prune_channels", "apply_history",
    "base_model", "base_record", "base_record_of", "save_pretrained", "from_pretrained", "load_records",
    "save_compressed", "load_compressed", "replay",
]
