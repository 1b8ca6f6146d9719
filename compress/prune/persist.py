"""Save a compressed model as weights + the recipe of transformations; load it back in one call.

``save_pretrained(model, dir, records, base=dense_original)`` / ``from_pretrained(dir)`` are the
one-call API (``save_compressed``/``load_compressed`` take the whole chain, base record first).
Why not diffusers' own ``model.save_pretrained``: a pruned diffusers model keeps its dense
``config`` (e.g. ``block_out_channels=(320, ...)``), so diffusers' ``from_pretrained`` rebuilds
the dense architecture and the weights no longer fit. Here the directory holds

- ``weights.safetensors``: the compressed state dict;
- ``record.json``: the base model (an allow-listed builder and its arguments) and the ordered
  transformation records (op, arguments, what changed, torch-pruning's ``pruning_history()``).

:func:`load_compressed` builds the base model on ``meta`` (no memory, no init cost), replays
every transformation, checks every tensor shape against the file, then loads the weights.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import AdcError
from ..io import atomic_dir, atomic_write_text, load_safetensors, read_format_json, save_safetensors
from ..zoo.construct import build_module
from ._common import TransformRecord, count_params, import_target, qualname
from .attention import restore_attention

FORMAT, VERSION = "adc-compressed", 1
WEIGHTS, RECORD = "weights.safetensors", "record.json"


def base_model(target: str, device: str | torch.device = "cpu", **kwargs: Any) -> tuple[nn.Module, TransformRecord]:
    """Build the starting model and the ``base`` record that rebuilds it.

    ``target``: ``"compress.zoo.sd:build_unet"`` (with ``size="tiny"``), or a diffusers class such
    as ``"diffusers:UNet2DConditionModel"`` with its config as keyword arguments. Only builders
    under ``torch.nn``, ``diffusers`` and ``compress`` are accepted. ``kwargs`` must be JSON data.
    """
    try:
        json.dumps(kwargs)
    except TypeError as exc:
        raise AdcError(f"base_model {target!r}: arguments must be JSON data ({exc})") from None
    model = _build_base(target, kwargs, device)
    return model, TransformRecord("base", {"target": target, "kwargs": kwargs}, 0, count_params(model))


def base_record(target: str, params: int = 0, **kwargs: Any) -> TransformRecord:
    """The ``base`` record for a model built by ``target(**kwargs)`` (not built here: the caller has it)."""
    try:
        json.dumps(kwargs)
    except TypeError as exc:
        raise AdcError(f"base_record {target!r}: arguments must be JSON data ({exc})") from None
    import_target(target)  # refuse builders outside the allow-list now, not at load time
    return TransformRecord("base", {"target": target, "kwargs": kwargs}, 0, params)


def base_record_of(model: nn.Module) -> TransformRecord:
    """The ``base`` record of a diffusers model (a ``ConfigMixin``): its class and ``__init__`` config.

    Why: a compressed model is rebuilt from the dense model it started as; the config is enough
    to build that on ``meta`` (no weights, no init cost) before the records are replayed.
    """
    cls = type(model)
    if not hasattr(cls, "from_config") or not hasattr(getattr(model, "config", None), "items"):
        raise AdcError(f"base: {cls.__name__} has no diffusers config to rebuild it from; pass "
                       "base=base_record('package.module:Builder', **kwargs) instead")
    import diffusers

    from ..student import init_config

    target = f"diffusers:{cls.__name__}" if getattr(diffusers, cls.__name__, None) is cls else qualname(cls)
    return base_record(target, count_params(model), **init_config(model))


def _build_base(target: str, kwargs: dict[str, Any], device: str | torch.device) -> nn.Module:
    builder = import_target(target)
    try:
        takes_device = "device" in inspect.signature(builder).parameters and not isinstance(builder, type)
    except (TypeError, ValueError):
        takes_device = False
    try:
        model = builder(**kwargs, device=device) if takes_device else build_module(lambda: builder(**kwargs), device)
    except TypeError as exc:
        raise AdcError(f"base model {target!r}: bad arguments ({exc})") from None
    if not isinstance(model, nn.Module):
        raise AdcError(f"base model {target!r} built a {type(model).__name__}, not a module")
    return model.eval()


# --------------------------------------------------------------------------------------------
# Replaying records
# --------------------------------------------------------------------------------------------
def _replay_remove_modules(model, r):
    from .remove import remove_modules

    return remove_modules(model, r.args["patterns"], r.args["replacement"], inplace=True)[0]


def _replay_remove_conditioning(model, r):
    from .remove import remove_conditioning

    return remove_conditioning(model, r.args["drop"], inplace=True)[0]


def _replay_fold_timestep(model, r):
    from .fold import fold_timestep

    text_time = r.args.get("text_time")
    if text_time:  # the folded values are in the saved biases: zeros give the same architecture
        text_time = {"time_ids": text_time["time_ids"], "text_embeds": None}
    return fold_timestep(model, r.args["timestep"], text_time, inplace=True)[0]


def _replay_fold_cross_attention(model, r):
    from .fold import fold_cross_attention

    p = next(model.parameters())
    ehs = torch.zeros(1, r.args["tokens"], r.args["dim"], device=p.device, dtype=p.dtype)
    return fold_cross_attention(model, ehs, inplace=True)[0]


def _replay_widen_module(model, r):
    from .interface import widen_module

    a = r.args
    return widen_module(model, a["name"], a["in_channels"], a["out_channels"], a["mode"], inplace=True)[0]


def _replay_slice_width(model, r):
    from .slice import slice_width

    a = r.args
    return slice_width(model, a["ratio_keep"], a["gn_policy"], tuple(a["divisors"]), a["attention_scale"],
                       inplace=True)[0]


def _replay_prune_channels(model, r):
    # By the recorded shapes, not by re-tracing torch-pruning: the weights are loaded afterwards,
    # only the architecture has to be reproduced (apply_history re-applies the pruning to dense weights).
    return apply_shapes(model, r)


REPLAY: dict[str, Callable[[nn.Module, TransformRecord], nn.Module]] = {
    "remove_modules": _replay_remove_modules,
    "remove_conditioning": _replay_remove_conditioning,
    "fold_timestep": _replay_fold_timestep,
    "fold_cross_attention": _replay_fold_cross_attention,
    "widen_module": _replay_widen_module,
    "slice_width": _replay_slice_width,
    "prune_channels": _replay_prune_channels,
}


def apply_shapes(model: nn.Module, record: TransformRecord) -> nn.Module:
    """Give every module the shapes and width attributes a record says it ended with (in place).

    Used when a transformation cannot be re-run (pruning traced with a custom ``forward_fn``):
    the weights are loaded afterwards, so only the architecture has to be reproduced.
    """
    from ._common import rebuild_conv, rebuild_group_norm, rebuild_layer_norm, rebuild_linear, swap_modules

    mapping = {}
    for c in record.changes:
        if c.action != "resized":
            continue
        m = model.get_submodule(c.name)
        p = next(m.parameters(), None)
        kw = {"device": p.device if p is not None else "cpu", "dtype": p.dtype if p is not None else torch.float32}
        empty = lambda key: torch.empty(c.after[key], **kw) if key in c.after else None  # noqa: E731
        if isinstance(m, nn.Linear):
            mapping[m] = rebuild_linear(m, empty("weight"), empty("bias"))
        elif isinstance(m, nn.modules.conv._ConvNd):
            mapping[m] = rebuild_conv(m, empty("weight"), empty("bias"))
        elif isinstance(m, nn.GroupNorm):
            width = c.after.get("num_channels") or c.after["weight"][0]
            mapping[m] = rebuild_group_norm(m, m.num_groups if width % m.num_groups == 0 else 1,
                                            empty("weight"), empty("bias"), width)
        elif isinstance(m, nn.LayerNorm):
            width = (c.after.get("normalized_shape") or c.after["weight"])[0]
            mapping[m] = rebuild_layer_norm(m, width, empty("weight"), empty("bias"))
        else:
            raise AdcError(f"record resizes {c.name!r} ({type(m).__name__}), which cannot be rebuilt from shapes")
    swap_modules(model, mapping)
    attention = []
    for c in record.changes:
        if c.action == "regrouped":
            model.get_submodule(c.name).num_groups = c.after["num_groups"]
        elif c.action == "attribute":
            if "heads" in c.after:
                attention.append({"name": c.name, "after": c.after})
            else:
                m = model.get_submodule(c.name)
                for k, v in c.after.items():
                    setattr(m, k, v)
    restore_attention(model, attention)
    return model


def replay(chain: Sequence[TransformRecord | dict], device: str | torch.device = "meta") -> nn.Module:
    """Rebuild the architecture a chain of records describes (weights are whatever init gave)."""
    records = [r if isinstance(r, TransformRecord) else TransformRecord.from_dict(r, f"chain[{i}]")
               for i, r in enumerate(chain)]
    _check_chain(records)
    base = records[0]
    model = _build_base(base.args["target"], dict(base.args.get("kwargs", {})), device)
    for i, r in enumerate(records[1:], start=1):
        try:
            model = REPLAY[r.op](model, r)
        except AdcError as exc:
            raise AdcError(f"replaying chain[{i}] ({r.op}): {exc}") from None
    return model


def _check_chain(records: list[TransformRecord]) -> None:
    if not records or records[0].op != "base":
        raise AdcError("record chain: the first record must be the 'base' model (see compress.prune.persist.base_model)")
    for i, r in enumerate(records[1:], start=1):
        if r.op == "base":
            raise AdcError(f"record chain[{i}]: a second 'base' record; composing models is not supported")
        if r.op not in REPLAY:
            raise AdcError(f"record chain[{i}]: op {r.op!r} cannot be replayed (known: {', '.join(REPLAY)})")
        if r.op == "remove_modules" and r.args.get("replacement", {}).get("replayable") is False:
            raise AdcError(f"record chain[{i}] (remove_modules): the replacement was given as a module instance; "
                           "pass a ModuleSpec so that it can be rebuilt")


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------
def save_compressed(model: nn.Module, record_chain: Sequence[TransformRecord | dict], path: str | os.PathLike,
                    verify: bool = True, weights: bool = True) -> Path:
    """Write ``path/weights.safetensors`` and ``path/record.json`` atomically (all or nothing).

    ``verify``: replay the chain on ``meta`` first and refuse to save when the rebuilt
    architecture's tensor shapes differ from ``model``'s (a record missing from the chain).
    ``weights=False``: the architecture only (``record.json``; the model may live on ``meta``);
    :func:`load_compressed` then returns it on ``meta``.
    """
    records = [r if isinstance(r, TransformRecord) else TransformRecord.from_dict(r, f"record_chain[{i}]")
               for i, r in enumerate(record_chain)]
    _check_chain(records)
    state = {k: v for k, v in model.state_dict().items()}
    if weights and any(v.is_meta for v in state.values()):
        raise AdcError("save_compressed: the model has meta tensors (no weights to save; pass weights=False)")
    shapes = {k: list(v.shape) for k, v in state.items()}
    if verify:
        rebuilt = {k: list(v.shape) for k, v in replay(records, "meta").state_dict().items()}
        _compare(rebuilt, shapes, "the replayed chain", "the model")
    import diffusers
    import torch_pruning

    meta = {"format": FORMAT, "version": VERSION, "weights": WEIGHTS if weights else None, "params": count_params(model),
            "tensors": shapes, "chain": [r.to_dict() for r in records],
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "torch_pruning": getattr(torch_pruning, "__version__", "?")}}
    text = json.dumps(meta, indent=1, sort_keys=False, default=_json_default)
    path = Path(path)
    with atomic_dir(path) as tmp:
        if weights:
            save_safetensors(state, tmp / WEIGHTS, metadata={"format": FORMAT})
        atomic_write_text(tmp / RECORD, text + "\n")
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, torch.dtype):
        return str(o).removeprefix("torch.")
    raise TypeError(f"{type(o).__name__} is not JSON data")


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    f = Path(path) / RECORD
    meta = read_format_json(f, FORMAT, "save_compressed")
    if meta.get("version") != VERSION:
        raise AdcError(f"{f}: version {meta.get('version')!r} is not supported (expected {VERSION})")
    return meta


def load_compressed(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved by :func:`save_compressed` and load its weights (eval mode)."""
    path = Path(path)
    meta = read_record(path)
    model = replay(meta["chain"], "meta")
    if meta.get("weights", WEIGHTS) is None:  # saved without weights: the architecture, on meta
        return model.eval()
    state = load_safetensors(path / meta.get("weights", WEIGHTS), device=str(device))
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    _compare(expected, {k: list(v.shape) for k, v in state.items()}, "the replayed chain", f"{path / WEIGHTS}")
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise AdcError(f"{path}: {left[0]!r} has no saved value ({len(left)} tensors); the file is incomplete")
    return model.eval()


def save_pretrained(model: nn.Module, path: str | os.PathLike, records: Sequence[TransformRecord | dict] = (), *,
                    base: nn.Module | TransformRecord | dict | None = None, verify: bool = True) -> Path:
    """Save a compressed ``model`` in one call: its weights and its transformation records, in ``path``.

    ``records``: what the transformations returned, in order. ``base``: where they started, the
    dense original module (a diffusers model, recorded by its config) or a ``base`` record; leave
    it out when ``records`` already starts with one. :func:`from_pretrained` loads the model back,
    :func:`load_records` its records. Atomic; ``verify`` as in :func:`save_compressed`. A model
    on ``meta`` (structure only) is saved without weights and loads back on ``meta``.
    """
    chain = list(records)
    head = chain[0] if chain else None
    starts = (head.op if isinstance(head, TransformRecord) else head.get("op") if isinstance(head, dict) else None) == "base"
    if base is not None and starts:
        raise AdcError("save_pretrained: records already start with a 'base' record; leave out base=")
    if base is None and not starts:
        raise AdcError("save_pretrained: say what the records started from: base=<the dense original model>")
    if base is not None:
        chain.insert(0, base if isinstance(base, (TransformRecord, dict)) else base_record_of(base))
    return save_compressed(model, chain, path, verify=verify,
                           weights=not any(t.is_meta for t in (*model.parameters(), *model.buffers())))


def from_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The compressed model saved in ``path`` by :func:`save_pretrained`, in eval mode on ``device``."""
    return load_compressed(path, device)


def load_records(path: str | os.PathLike) -> list[TransformRecord]:
    """The records kept with a saved model: its ``base`` record, then one per transformation."""
    return [TransformRecord.from_dict(d, f"{Path(path) / RECORD}: chain[{i}]")
            for i, d in enumerate(read_record(path)["chain"])]


def _compare(a: dict[str, list[int]], b: dict[str, list[int]], name_a: str, name_b: str) -> None:
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if missing:
        raise AdcError(f"{name_b} lacks {missing[0]!r}, which {name_a} has ({len(missing)} keys differ)")
    if extra:
        raise AdcError(f"{name_b} has {extra[0]!r}, which {name_a} lacks ({len(extra)} keys differ)")
    for k in a:
        if a[k] != b[k]:
            raise AdcError(f"{k!r}: {name_a} has shape {a[k]}, {name_b} has {b[k]}")


__all__ = ["base_model", "base_record", "base_record_of", "save_pretrained", "from_pretrained", "load_records",
           "save_compressed", "load_compressed", "replay", "apply_shapes", "read_record", "REPLAY"]
