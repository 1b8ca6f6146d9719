"""The composite student: PixelUnshuffle -> compressed UNet -> decoder from its mid-block on.

A student is two compressed modules plus wiring: the UNet (from SD by remove/widen/slice/prune
records) and the VAE decoder (pruned, then pretrained in stage 1). Each is persisted by
:func:`compress.prune.save_compressed` with its own transformation chain; ``student.json``
holds the wiring. The student trains its own copy of the decoder mid-block (saved beside); the
decoder keeps its own mid-block and ``conv_in`` for the teacher and ground-truth paths.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .io import atomic_write_json, load_safetensors, read_format_json, save_safetensors
from .zoo.adcsr import AdcSR, AdcSRConfig, DecoderUpPath

STUDENT_FILE, MID_FILE = "student.json", "mid_block.safetensors"


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
                       decoder_block_out_channels=dec_widths, decoder_norm_groups=norms[0] if norms else 1)


def compose_student(unet: nn.Module, decoder: nn.Module, unshuffle: int = 2, color_fix: bool = True) -> AdcSR:
    """Wire a condition-free UNet into ``decoder``'s mid-block (copied: the student trains its own)."""
    return AdcSR(unet, copy.deepcopy(decoder.mid_block), DecoderUpPath.from_decoder(decoder),
                 student_config(unet, decoder, unshuffle), color_fix)


def save_student(path: str | Path, student: AdcSR, unet_chain: Sequence, decoder: nn.Module,
                 decoder_chain: Sequence, extra: dict[str, Any] | None = None) -> Path:
    """Write ``path/unet``, ``path/decoder`` (compressed-model dirs), the student's own mid-block
    and ``path/student.json``. ``decoder`` is saved as given (its mid-block is the frozen one of
    the teacher/ground-truth path, as in AdcSR's ``halfDecoder.ckpt``); the up path is shared."""
    from .prune import save_compressed

    path = Path(path)
    save_compressed(student.unet, unet_chain, path / "unet")
    save_compressed(decoder, decoder_chain, path / "decoder")
    save_safetensors(student.mid_block.state_dict(), path / MID_FILE)
    atomic_write_json(path / STUDENT_FILE, {"format": "adc-student", "version": 1,
                                            "unshuffle": student.config.unshuffle, "color_fix": student.color_fix,
                                            **(extra or {})})
    return path


def read_chain(path: str | Path) -> list[dict]:
    from .prune.persist import read_record

    return read_record(path)["chain"]


def load_student(path: str | Path, device: str | torch.device = "cpu") -> tuple[AdcSR, nn.Module]:
    """(student, decoder) from :func:`save_student`'s directory; the decoder keeps its conv_in."""
    from .prune import load_compressed

    path = Path(path)
    meta = read_format_json(path / STUDENT_FILE, "adc-student", "adc's save_student")
    unet = load_compressed(path / "unet", device)
    decoder = load_compressed(path / "decoder", device)
    student = compose_student(unet, decoder, int(meta.get("unshuffle", 2)), bool(meta.get("color_fix", True)))
    student.mid_block.load_state_dict(load_safetensors(path / MID_FILE, device=str(device)))
    return student.eval(), decoder


def find_student(path: str | Path) -> Path | None:
    """The student directory in ``path``: itself, ``path/student``, or the last stage's ``student/`` of a run."""
    path = Path(path)
    if (path / STUDENT_FILE).is_file():
        return path
    if (path / "student" / STUDENT_FILE).is_file():
        return path / "student"
    stages = sorted(p for p in path.glob("[0-9][0-9]-*/student") if (p / STUDENT_FILE).is_file())
    return stages[-1] if stages else None
