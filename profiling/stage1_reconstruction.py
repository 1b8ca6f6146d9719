"""Stage 1's decoders on images no stage uses: reconstruction PSNR-Y of each run's pre-trained decoder.

    python -m profiling.stage1_reconstruction RUN_DIR [RUN_DIR ...] [--hr ../shared/data/realsr/HR] [--every 4]

Each RUN_DIR is a run of a tiny recipe through ``pretrain_decoder`` (its ``NN-pretrain_decoder/student``).
The images: every ``--every``-th HR file of ``--hr`` that is *not* one of the recipe's eval pairs, at full
size, so a stage-1 setting is chosen on images that are neither trained on nor the held-out eval pairs
(the four the stage itself reports on are too few to rank settings). Path: HR -> the teacher's VAE encoder
(latent mean) -> ``post_quant_conv`` -> decoder; the first line is the teacher's own full decoder (the ceiling).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from compress.bundle import Bundle
    from compress.data.images import list_images, read_image, to_chw_tensor
    from compress.metrics import psnr_y
    from compress.recipe import load_recipe
    from compress.stages.recover import _decoder_input, _real_vae
    from compress.student import load_student_state

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--hr", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "realsr" / "HR")
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.runs[0] / "recipe.resolved.yaml", [])
    held_out = {p.name for p in list_images(recipe.data.eval_hr)} if recipe.data.eval_hr else set()
    paths = [p for p in list_images(args.hr) if p.name not in held_out][::args.every]
    hr = torch.stack([to_chw_tensor(read_image(p)) for p in paths])
    vae = _real_vae(Bundle(recipe, args.runs[0]))
    with torch.no_grad():
        hs = [_decoder_input(vae, c) for c in hr.split(4)]

    @torch.no_grad()
    def score(decoder) -> float:
        return float(torch.cat([psnr_y(((decoder(h) + 1) / 2).clamp(0, 1), c) for h, c in zip(hs, hr.split(4))]).mean())

    print(f"{len(paths)} HR images of {args.hr} (every {args.every}th, the {len(held_out)} eval pairs left out)")
    print(f"teacher's full decoder (ceiling)\t{score(vae.decoder.eval()):.2f} dB")
    for run in args.runs:
        found = sorted(run.glob("*-pretrain_decoder/student"))
        if not found:
            print(f"{run}\tno pretrain_decoder stage")
            continue
        print(f"{run}\t{score(load_student_state(found[-1]).decoder.eval()):.2f} dB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
