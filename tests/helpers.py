"""Helpers shared by the tests: where the RealSR images are."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_REALSR = REPO.parent / "shared" / "data" / "realsr"


def realsr() -> Path:
    """The full RealSR set beside the repo, else the six samples shipped in it."""
    for root in (SHARED_REALSR, REPO / "data" / "samples" / "realsr"):
        if (root / "HR").is_dir():
            return root
    pytest.skip("no RealSR images (../shared/data/realsr or data/samples/realsr)")


def save_sd_dir(model, root: Path) -> Path:
    """Write a tiny pipeline's plain (LoRA-free) UNet, VAE and text encoder as a local diffusers folder."""
    from compress.zoo.lora import plain_key
    from compress.zoo.sd import build_text_encoder, build_unet, build_vae

    for name, build, src in (("unet", build_unet, model.unet), ("vae", build_vae, model.vae),
                             ("text_encoder", build_text_encoder, model.text_encoder)):
        overrides = {"unet": getattr(model.config, "unet_overrides", {}),  # S3Diff's tiny config has none
                     "vae": getattr(model.config, "vae_overrides", {})}.get(name, {})
        plain = build("tiny", **overrides)
        plain.load_state_dict({plain_key(k): v for k, v in src.state_dict().items() if plain_key(k) is not None})
        plain.save_pretrained(root / name)
    return root


def tiny_distill_recipe(name: str, data: str, distill: str, tail: str = "") -> str:
    """A recipe for runner tests: the tiny OSEDiff (random weights) -> remove -> prune -> distill
    (``distill``: the stage's YAML flow mapping), then ``tail`` (more stage lines)."""
    return (f"name: {name}\nseed: 0\ndevice: cpu\nthreads: 1\nmodels: {{family: osediff, size: tiny}}\n"
            f"task: {{lr_size: 32}}\ndata: {data}\nstages:\n  - remove: {{init: teacher}}\n  - prune: {{}}\n"
            f"  - distill: {distill}\n{tail}")


# A structure-only run (the student's records on meta, no weights): what `adc analyse` and `adc compare`
# take as a run directory, in seconds. One text for the tests and the reliability benchmark.
from profiling.hostile import STUDENT_RUN  # noqa: E402,F401
