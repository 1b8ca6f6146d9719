"""The AdcSR-style student blueprint, what it is made of, and how a run hands it on.

Blueprint: input stem (PixelUnshuffle, replacing the teacher's re-encoder) -> the denoiser
(condition-free UNet) -> the decoder from its mid-block on. A family says which teacher parts
feed it (:meth:`compress.families.ModelFamily.student_parts`); the analysis plan says what to
drop from them; :mod:`compress.prune` does it; each part keeps its chain of transformation
records, so :func:`load_student` rebuilds the architecture from the base configs in one call.

A :class:`StudentState` is what stages hand each other in memory: the composite student, the
decoder whose ``conv_in`` + ``mid_block`` make the distillation targets (its up path is the
student's), and the two record chains. The runner saves it once at each stage boundary
(:func:`save_student`); without weights (a structure-only run on ``meta``) only the records
are written.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io import atomic_write_json, load_safetensors, read_format_json, save_safetensors
from .zoo.adcsr import AdcSR, AdcSRConfig, DecoderUpPath

STUDENT_FILE, MID_FILE = "student.json", "mid_block.safetensors"
UNET_TARGET = "diffusers:UNet2DConditionModel"
DECODER_TARGET = "diffusers.models.autoencoders.vae:Decoder"


# --------------------------------------------------------------------------------------------
# Parts: plain modules + the base record that rebuilds their architecture
# --------------------------------------------------------------------------------------------
def _json(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_json(x) for x in v]
    if isinstance(v, dict):
        return {k: _json(x) for k, x in v.items()}
    return v


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def init_config(model: nn.Module) -> dict[str, Any]:
    """The ``__init__`` arguments of a diffusers ``ConfigMixin`` model, from its config (JSON data)."""
    params = inspect.signature(type(model).__init__).parameters
    return {k: _json(v) for k, v in dict(model.config).items() if k in params}


def unet_part(unet: nn.Module, path: str = "unet"):
    """A plain diffusers UNet as a student part (its base record rebuilds it from its config on meta)."""
    from .families.base import PartSource
    from .prune.persist import base_record

    return PartSource(unet, base_record(UNET_TARGET, _params(unet), **init_config(unet)), path)


def decoder_kwargs(vae: nn.Module) -> dict[str, Any]:
    """``Decoder`` arguments as ``AutoencoderKL.__init__`` passes them."""
    c = vae.config
    kw = {"in_channels": c.latent_channels, "out_channels": c.out_channels, "up_block_types": _json(c.up_block_types),
          "block_out_channels": _json(c.block_out_channels), "layers_per_block": c.layers_per_block,
          "norm_num_groups": c.norm_num_groups, "act_fn": c.act_fn}
    if "mid_block_add_attention" in c:
        kw["mid_block_add_attention"] = c.mid_block_add_attention
    return kw


def decoder_part(vae: nn.Module, path: str = "vae.decoder"):
    """An ``AutoencoderKL``'s decoder as a student part."""
    from .families.base import PartSource
    from .prune.persist import base_record

    return PartSource(vae.decoder, base_record(DECODER_TARGET, _params(vae.decoder), **decoder_kwargs(vae)), path)


# --------------------------------------------------------------------------------------------
# The composite student
# --------------------------------------------------------------------------------------------
def student_config(unet: nn.Module, decoder: nn.Module, unshuffle: int) -> AdcSRConfig:
    """An :class:`AdcSRConfig` describing the actual widths (for padding rules and reports)."""
    widths = tuple(b.resnets[-1].conv2.out_channels for b in unet.down_blocks)
    heads = tuple(b.attentions[0].transformer_blocks[0].attn1.heads if getattr(b, "attentions", None) else 0
                  for b in unet.down_blocks)
    dec_widths = tuple(reversed([b.resnets[-1].conv2.out_channels for b in decoder.up_blocks]))
    norms = [m.num_groups for m in decoder.modules() if isinstance(m, nn.GroupNorm)]
    return AdcSRConfig(unet_block_out_channels=widths, unet_heads=heads,
                       down_block_types=tuple(type(b).__name__ for b in unet.down_blocks),
                       up_block_types=tuple(type(b).__name__ for b in unet.up_blocks),
                       layers_per_block=len(unet.down_blocks[0].resnets), unshuffle=unshuffle,
                       decoder_block_out_channels=dec_widths, decoder_norm_groups=norms[0] if norms else 1,
                       latent_channels=decoder.conv_in.in_channels)


def compose_student(unet: nn.Module, decoder: nn.Module, unshuffle: int = 2, color_fix: bool = True) -> AdcSR:
    """Wire a condition-free UNet into ``decoder``'s mid-block (copied: the student trains its own)."""
    return AdcSR(unet, copy.deepcopy(decoder.mid_block), DecoderUpPath.from_decoder(decoder),
                 student_config(unet, decoder, unshuffle), color_fix)


@dataclass
class StudentState:
    """The student between stages: the model, the target-side decoder, the record chains."""

    model: AdcSR
    decoder: nn.Module
    chains: dict[str, list] = field(default_factory=dict)   # "unet" / "decoder" -> TransformRecords
    info: dict[str, Any] = field(default_factory=dict)      # where the weights came from, ...

    @property
    def on_meta(self) -> bool:
        """True for a structure-only student (no weights: built on meta)."""
        return any(p.is_meta for p in self.model.parameters())

    def params(self) -> int:
        return _params(self.model)

    def recompose(self, unet: nn.Module | None = None, decoder: nn.Module | None = None) -> "StudentState":
        """A new state with the UNet and/or decoder replaced (the student's mid-block copied anew from
        ``decoder`` when one is given, as AdcSR builds its ``Net`` from the stage-1 decoder)."""
        unet = unet if unet is not None else self.model.unet
        if decoder is None:
            model = AdcSR(unet, self.model.mid_block, self.model.up,
                          student_config(unet, self.decoder, self.model.config.unshuffle), self.model.color_fix)
            return StudentState(model, self.decoder, self.chains, self.info)
        return StudentState(compose_student(unet, decoder, self.model.config.unshuffle, self.model.color_fix),
                            decoder, self.chains, self.info)


def save_student(path: str | Path, state: StudentState, extra: dict[str, Any] | None = None) -> Path:
    """Write ``path/unet``, ``path/decoder`` (compressed-model dirs), the student's own mid-block and
    ``path/student.json``. ``state.decoder`` is saved as given (its mid-block is the frozen one of the
    teacher/ground-truth path, as in AdcSR's ``halfDecoder.ckpt``); the up path is shared. A
    structure-only state writes records but no weights."""
    from .prune import save_compressed

    path = Path(path)
    weights = not state.on_meta
    save_compressed(state.model.unet, state.chains["unet"], path / "unet", weights=weights)
    save_compressed(state.decoder, state.chains["decoder"], path / "decoder", weights=weights)
    if weights:
        save_safetensors(state.model.mid_block.state_dict(), path / MID_FILE)
    atomic_write_json(path / STUDENT_FILE, {"format": "adc-student", "version": 1, "weights": weights,
                                            "unshuffle": state.model.config.unshuffle,
                                            "color_fix": state.model.color_fix, **state.info, **(extra or {})})
    return path


def read_chain(path: str | Path) -> list[dict]:
    from .prune.persist import read_record

    return read_record(path)["chain"]


def load_student_state(path: str | Path, device: str | torch.device = "cpu") -> StudentState:
    """The :class:`StudentState` saved by :func:`save_student` (on ``meta`` when it has no weights)."""
    from .prune import load_compressed
    from .prune._common import TransformRecord

    path = Path(path)
    meta = read_format_json(path / STUDENT_FILE, "adc-student", "adc's save_student")
    unet = load_compressed(path / "unet", device)
    decoder = load_compressed(path / "decoder", device)
    model = compose_student(unet, decoder, int(meta.get("unshuffle", 2)), bool(meta.get("color_fix", True)))
    if meta.get("weights", True):
        model.mid_block.load_state_dict(load_safetensors(path / MID_FILE, device=str(device)))
    chains = {k: [TransformRecord.from_dict(r, f"{path / k}.chain[{i}]") for i, r in enumerate(read_chain(path / k))]
              for k in ("unet", "decoder")}
    info = {k: v for k, v in meta.items() if k not in ("format", "version", "weights", "unshuffle", "color_fix")}
    return StudentState(model.eval(), decoder, chains, info)


def load_student(path: str | Path, device: str | torch.device = "cpu") -> tuple[AdcSR, nn.Module]:
    """(student, decoder) from :func:`save_student`'s directory; the decoder keeps its conv_in."""
    state = load_student_state(path, device)
    return state.model, state.decoder


def find_student(path: str | Path) -> Path | None:
    """The student directory in ``path``: itself, ``path/student``, or the last stage's ``student/`` of a run."""
    path = Path(path)
    if (path / STUDENT_FILE).is_file():
        return path
    if (path / "student" / STUDENT_FILE).is_file():
        return path / "student"
    stages = sorted(p for p in path.glob("[0-9][0-9]-*/student") if (p / STUDENT_FILE).is_file())
    return stages[-1] if stages else None


__all__ = ["StudentState", "compose_student", "student_config", "save_student", "load_student",
           "load_student_state", "find_student", "read_chain", "unet_part", "decoder_part", "init_config",
           "decoder_kwargs"]
