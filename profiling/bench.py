"""Print MAC counts and latencies of SD-2.1-base-shaped models (random weights, no download).

    python -m profiling.bench macs [--latent 64] [--batch 1] [--cross-check] [--json out.json]
    python -m profiling.bench latency [--model unet|decoder] [--device cuda] [--dtype fp16]
        [--autocast] [--channels-last] [--compile] [--tiny] [--warmup 10] [--repeats 50]

``macs`` counts on meta tensors (seconds, < 1 GB RAM). ``--cross-check`` adds fvcore and thop
on a tiny UNet (they need real weights), to show what each counter leaves out. ``latency``
times the forward of one component; numbers are only comparable on the same device, dtype and
settings, all of which are printed. A figure, not a test: CPU timings here are noisy.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from compress.errors import AdcError
from compress.profile.counters import MacCounter, count_macs, count_macs_fvcore, count_macs_thop, count_params
from compress.profile.latency import measure_latency

SD21_UNET = dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
)
TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=8)


class UNetForward(nn.Module):
    """Positional-only, tensor-out UNet call, so jit-tracing counters (fvcore) accept it."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context):
        return self.unet(sample, timestep, context, return_dict=False)[0]


def _unet(tiny: bool) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**(TINY_UNET if tiny else SD21_UNET))


def _decoder(tiny: bool) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(TINY_VAE if tiny else SD_VAE)).decoder


def _unet_inputs(batch: int, latent: int, tiny: bool) -> tuple:
    ctx = 32 if tiny else 1024
    return torch.randn(batch, 4, latent, latent), torch.full((batch,), 999), torch.randn(batch, 77, ctx)


def cmd_macs(a: argparse.Namespace) -> list[dict]:
    out = []
    with torch.device("meta"):
        unet, dec = UNetForward(_unet(False)), _decoder(False)
    print(f"SD-2.1-base UNet: {count_params(unet)['total'] / 1e6:.1f} M params; "
          f"VAE decoder: {count_params(dec)['total'] / 1e6:.1f} M params")
    for name, model, args in (
        ("unet", unet, _unet_inputs(a.batch, a.latent, False)),
        ("vae.decoder", dec, (torch.randn(a.batch, 4, a.latent, a.latent),)),
    ):
        r = MacCounter(depth=a.depth).count(model, *args)
        print(f"\n== {name}, latent {a.latent}x{a.latent} (image {8 * a.latent}), batch {a.batch}\n{r}")
        out.append({"model": name, **r.to_dict()})
    if a.cross_check:
        tiny = UNetForward(_unet(True)).eval()
        args = _unet_inputs(1, 16, True)
        print("\n== cross-check on a tiny UNet (real CPU weights), MACs:")
        print(f"{'counter':<45} {'total':>12} {'conv+linear':>12} {'attention':>12} {'other':>12}")
        for fn in (count_macs, count_macs_fvcore, count_macs_thop):
            r = fn(tiny, *args)
            print(f"{r.counter + ' ' + r.counter_version:<45} {r.total:>12,} {r.conv_linear:>12,} "
                  f"{r.attention:>12,} {r.other:>12,}")
            out.append({"model": "tiny-unet", **r.to_dict()})
    return out


def cmd_latency(a: argparse.Namespace) -> list[dict]:
    model = _unet(a.tiny) if a.model == "unet" else _decoder(a.tiny)
    latent = a.latent if a.latent else (16 if a.tiny else 64)
    if a.model == "unet":
        fn, args = UNetForward(model), _unet_inputs(a.batch, latent, a.tiny)
    else:
        fn, args = model, (torch.randn(a.batch, 4, latent, latent),)
    r = measure_latency(fn, device=a.device, args=args, warmup=a.warmup, repeats=a.repeats, dtype=a.dtype,
                        autocast=a.autocast, channels_last=a.channels_last, compile=a.compile)
    print(f"== {a.model}{' (tiny)' if a.tiny else ''}, latent {latent}, batch {a.batch}\n{r}")
    return [{"model": a.model, "tiny": a.tiny, "latent": latent, "batch": a.batch, **r.to_dict()}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m profiling.bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("macs", help="MACs of SD-2.1-base UNet and VAE decoder, on meta")
    m.add_argument("--latent", type=int, default=64)
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--depth", type=int, default=2)
    m.add_argument("--cross-check", action="store_true")
    lt = sub.add_parser("latency", help="forward latency of one component")
    lt.add_argument("--model", choices=("unet", "decoder"), default="unet")
    lt.add_argument("--tiny", action="store_true", help="small config, for a CPU smoke run")
    lt.add_argument("--latent", type=int, default=0)
    lt.add_argument("--batch", type=int, default=1)
    lt.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    lt.add_argument("--dtype", default=None)
    lt.add_argument("--autocast", action="store_true")
    lt.add_argument("--channels-last", action="store_true")
    lt.add_argument("--compile", action="store_true")
    lt.add_argument("--warmup", type=int, default=10)
    lt.add_argument("--repeats", type=int, default=50)
    for sp in (m, lt):
        sp.add_argument("--json", default=None, help="also write the reports to this file")
    a = p.parse_args(argv)
    try:
        out = cmd_macs(a) if a.cmd == "macs" else cmd_latency(a)
    except AdcError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
