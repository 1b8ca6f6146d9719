"""Write random weights in every official file layout the ``osediff`` family reads, at full size.

    python profiling/synthetic_weights.py --out /tmp/adc-weights [--size full|tiny]

Writes, under ``--out``:

* ``stable-diffusion-2-1-base/``: a diffusers folder (``unet/``, ``vae/``, ``text_encoder/`` with
  ``save_pretrained``, ``scheduler/`` config, and a CLIP BPE ``tokenizer/`` whose vocabulary is
  synthetic: the special tokens at SD's ids, every byte as a token, fillers up to 49408);
* ``osediff.pkl``: OSEDiff's layout (module lists, ranks, LoRA + ``conv_in`` tensors);
* ``ram_swin_large_14m.pth`` (``{"model": ...}``) and ``DAPE.pth`` (LoRA): RAM's layouts;
* ``ram_tag_list.txt``: one tag a line, as many as RAM's classes;
* ``data/train_hr``, ``data/eval/LR``, ``data/eval/HR``: the RealSR samples shipped in ``data/``.

The values are random (nothing is downloaded): the files exercise every loader and the whole
real-weight path of ``recipes/adcsr.yaml`` (``profiling/fullsize.py``), not the quality.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples" / "realsr"


def _randomise(state: dict) -> dict:
    """Tensors of the same shapes with small random values (meta tensors become real ones)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = _randomise(v)
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = torch.randn(v.shape, generator=g) * 0.02
        elif isinstance(v, torch.Tensor):
            out[k] = torch.zeros(v.shape, dtype=v.dtype)
        else:
            out[k] = v
    return out


def write_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer with SD's special-token ids, every byte a token, fillers up to 49408, no merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for c in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(c, len(vocab))
    while len(vocab) < 49406:
        vocab[f"<|filler{len(vocab)}|>"] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 49406, 49407
    tok = CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=77)
    tok.save_pretrained(folder)


def write_all(out: Path, size: str = "full", log=print) -> dict[str, Path]:
    from compress.zoo.dape import build_dape, official_state_dicts
    from compress.zoo.osediff import build_osediff, osediff_state_dict
    from compress.zoo.sd import SD21_SCHEDULER, build_text_encoder, build_unet, build_vae

    out.mkdir(parents=True, exist_ok=True)
    sd = out / "stable-diffusion-2-1-base"
    torch.manual_seed(0)
    for name, build in (("unet", build_unet), ("vae", build_vae), ("text_encoder", build_text_encoder)):
        if not (sd / name).is_dir():
            log(f"writing {sd / name} (random {size} weights)")
            model = build(size, "cpu")
            model.save_pretrained(sd / name)
            del model
    (sd / "scheduler").mkdir(parents=True, exist_ok=True)
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler",
                                                                        **SD21_SCHEDULER}))
    write_tokenizer(sd / "tokenizer")
    log("writing osediff.pkl (OSEDiff's layout: LoRA + conv_in)")
    teacher = build_osediff(size, "meta")
    torch.save(_randomise(osediff_state_dict(teacher)), out / "osediff.pkl")
    log("writing ram_swin_large_14m.pth and DAPE.pth (RAM's layouts)")
    dape = build_dape(size, "meta")
    base, lora = official_state_dicts(dape)
    torch.save(_randomise(base), out / "ram_swin_large_14m.pth")
    torch.save(_randomise(lora), out / "DAPE.pth")
    (out / "ram_tag_list.txt").write_text("\n".join(f"tag{i}" for i in range(dape.config.num_classes)) + "\n")
    data = out / "data"
    for src, dst in ((SAMPLES / "HR", data / "train_hr"), (SAMPLES / "LR", data / "eval" / "LR"),
                     (SAMPLES / "HR", data / "eval" / "HR")):
        if not dst.is_dir():
            shutil.copytree(src, dst)
    return {"sd21_base": sd, "osediff": out / "osediff.pkl", "ram": out / "ram_swin_large_14m.pth",
            "dape": out / "DAPE.pth", "ram_tag_list": out / "ram_tag_list.txt", "train_hr": data / "train_hr",
            "eval_lr": data / "eval" / "LR", "eval_hr": data / "eval" / "HR"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", default="full", choices=("full", "tiny"))
    args = p.parse_args(argv)
    paths = write_all(args.out, args.size)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
