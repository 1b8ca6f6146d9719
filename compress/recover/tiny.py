"""Tiny random-init set-ups of both recovery stages, for tests, the benchmark and multi-process runs.

``python -m compress.recover.tiny stage2 --run-dir D --steps 6 --batch 2`` runs stage 2 on tiny
models and RealSR crops; under ``torchrun --nproc_per_node 2`` (or ``accelerate launch``) each
process runs it and DDP splits the global batch. Every model is built from ``--seed``, so all
processes (and a resumed run) start from the same weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dataclasses import replace

import torch

from ..errors import AdcError
from ..log import setup_logging
from ..config import float_in, int_in

REPO = Path(__file__).resolve().parents[2]


def realsr_root() -> Path:
    """The 100-pair RealSR set beside the checkout (``../shared/data/realsr``) or the 6-pair sample set."""
    for root in (REPO.parent / "shared" / "data" / "realsr", REPO / "data" / "samples" / "realsr"):
        if (root / "HR").is_dir() and (root / "LR").is_dir():
            return root
    raise AdcError(f"no RealSR images: neither {REPO.parent / 'shared/data/realsr'} nor {REPO / 'data/samples/realsr'}")


def tiny_stage1_models(seed: int = 0):
    from ..zoo.adcsr import ADCSR_TINY, build_half_decoder
    from ..zoo.osediff import OSEDIFF_TINY
    from ..zoo.sd import build_vae
    from .decoder_pretrain import DecoderModels

    torch.manual_seed(seed)
    vae = build_vae("tiny", **OSEDIFF_TINY.vae_overrides)  # the tiny teacher's VAE (its latent channels)
    decoder = build_half_decoder(ADCSR_TINY)
    return DecoderModels(vae=vae, decoder=decoder)


def tiny_stage2_parts(seed: int = 0, family: str | None = None) -> dict:
    """Student, teacher (the family's tiny teacher), stage-1 decoder and the SD UNet D starts from, all seeded."""
    from ..families import FLAGSHIP, get
    from ..zoo.adcsr import ADCSR_TINY, build_adcsr, build_half_decoder
    from ..zoo.sd import build_unet

    torch.manual_seed(seed)
    teacher = get(family or FLAGSHIP).build_teacher("tiny")
    torch.manual_seed(seed + 1)
    decoder = build_half_decoder(replace(ADCSR_TINY, latent_channels=_latent_channels(teacher)))
    torch.manual_seed(seed + 2)
    student = build_adcsr("tiny")
    torch.manual_seed(seed + 3)
    disc_unet = build_unet("tiny", in_channels=_latent_channels(teacher), out_channels=_latent_channels(teacher))
    return {"student": student, "teacher": teacher, "decoder": decoder, "disc_unet": disc_unet,
            "family": family or FLAGSHIP}


def _latent_channels(teacher) -> int:
    return int(teacher.vae.config.latent_channels)


def tiny_stage2_bundle(config, seed: int = 0, parts: dict | None = None):
    """The family's stage-2 parts around the tiny models (D starts from ``parts['disc_unet']``)."""
    from ..families import get
    from .distill import feature_distill_bundle

    p = parts or tiny_stage2_parts(seed)
    dparts = get(p["family"]).distill_parts(p["teacher"], "tiny", None)
    dparts.disc_unet = p["disc_unet"]
    return feature_distill_bundle(p["student"], p["decoder"], dparts, config)


class SlowDataset(torch.utils.data.Dataset):
    """Sleeps ``delay`` s per item, so a test can kill a run between two checkpoints."""

    def __init__(self, dataset, delay: float):
        self.dataset, self.delay = dataset, delay

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.dataset[i]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compress.recover.tiny", description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["stage1", "stage2"])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--steps", type=int_in(1, 10**9), default=6)
    ap.add_argument("--batch", type=int_in(1, 65536), default=2, help="global batch")
    ap.add_argument("--accum", type=int_in(1, 65536), default=1)
    ap.add_argument("--crop", type=int_in(16, 8192), default=64)
    ap.add_argument("--every", type=int_in(1, 10**9), default=2, help="checkpoint every N steps")
    ap.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0)
    ap.add_argument("--delay", type=float_in(0.0, 3600.0), default=0.0, help="seconds of sleep per item read")
    ap.add_argument("--threads", type=int_in(1, 1024), default=1)
    ap.add_argument("--lr", type=float_in(1e-12, 1.0), default=None, help="generator / decoder learning rate")
    ap.add_argument("--adv-weight", type=float_in(0.0, 1e6), default=None)
    ap.add_argument("--keep-best", action="store_true", help="stage 1: keep the best validated step (off: the "
                    "last step, so that equivalence tests compare trained weights)")
    ap.add_argument("--float64", action="store_true", help="run the models in float64 (exactness tests)")
    ap.add_argument("--checkpointing", action="store_true", help="engine.gradient_checkpointing (student and D)")
    ap.add_argument("--hr", type=Path, default=None, help="HR folder (default: RealSR HR)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup_logging()  # each process logs its engine summary ("N process(es)") on stderr
    try:
        from .engine import EngineConfig

        engine = EngineConfig(max_steps=args.steps, batch_size=args.batch, gradient_accumulation_steps=args.accum,
                              checkpoint_every=args.every, log_every=1, cpu=True, seed=args.seed, progress=False,
                              gradient_checkpointing=args.checkpointing)
        hr = [args.hr or realsr_root() / "HR"]
        from .decoder_pretrain import hr_crops

        data = hr_crops(hr, args.crop, True, args.seed)
        if args.delay:
            data = SlowDataset(data, args.delay)
        if args.stage == "stage1":
            from .decoder_pretrain import PretrainDecoderConfig, run_stage

            cfg = PretrainDecoderConfig(train_hr=hr, crop=args.crop, lpips_weight=0.0, disc_start=2, engine=engine,
                                        keep_best=args.keep_best,
                                        **({"lr": args.lr} if args.lr else {}),
                                        **({"adv_weight": args.adv_weight} if args.adv_weight is not None else {}))
            models = tiny_stage1_models(args.seed)
            if args.float64:
                models.vae.double(), models.decoder.double()
            out = run_stage(models, cfg, args.run_dir, dataset=data)
        else:
            from .distill import DistillConfig, run_stage

            cfg = DistillConfig(train_hr=hr, crop=args.crop, lr_milestones=[max(1, args.steps // 2)], engine=engine,
                                prompt="empty",
                                **({"lr_g": args.lr} if args.lr else {}),
                                **({"adv_weight": args.adv_weight} if args.adv_weight is not None else {}))
            parts = tiny_stage2_parts(args.seed)
            if args.float64:
                for m in parts.values():
                    if isinstance(m, torch.nn.Module):
                        m.double()
            bundle = tiny_stage2_bundle(cfg, args.seed, parts)
            out = run_stage(bundle, cfg, args.run_dir, dataset=data)
    except AdcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    from .engine import process_state

    if process_state(engine).is_main_process:
        print(json.dumps({k: v for k, v in out.items() if isinstance(v, (str, int, float)) or v is None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
