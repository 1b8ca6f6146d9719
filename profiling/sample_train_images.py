"""Cut the demo's training sample (``data/samples/train/``) from BSD100 / Urban100 HR images.

The demo's recovery stages must train on images that are not its eval pairs; this writes a
small, fixed subset (centre crops, PNG) that ships with the project. Run once, from local copies
of the HR sets (for example jbhuang0604/SelfExSR ``data/BSD100/image_SRF_4`` and
``data/Urban100/image_SRF_4``, the ``*_HR.png`` files):

    python profiling/sample_train_images.py --bsd100 DIR --urban100 DIR --out data/samples/train
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image


def centre_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bsd100", type=Path, required=True)
    ap.add_argument("--urban100", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("data/samples/train"))
    ap.add_argument("--per-set", type=int, default=12, help="images per set: every (100 / n)-th, in name order")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for tag, folder in (("bsd100", args.bsd100), ("urban100", args.urban100)):
        files = sorted(folder.glob("*_HR.png")) or sorted(folder.glob("*.png"))
        if not files:
            raise SystemExit(f"{folder}: no PNG images")
        step = max(1, len(files) // args.per_set)
        for path in files[::step][:args.per_set]:
            crop = centre_crop(Image.open(path).convert("RGB"), args.size)
            crop.save(args.out / f"{tag}_{path.stem.split('_SRF')[0]}.png", optimize=True)
    print(f"wrote {len(list(args.out.glob('*.png')))} images to {args.out}")


if __name__ == "__main__":
    main()
