"""Draw docs/img/objects_world.png: eight objects-world scenes (seed 0, train split, as `matchmap synth
--world objects --seed 0` draws them) with two of their captions and their ground-truth boxes.

    .venv/bin/python scripts/objects_world_picture.py [--out docs/img/objects_world.png]
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from training.objects_world import describe_object_scene, random_object_scene
from training.synth import pair_rng

TILE, TEXT_HEIGHT, COLUMNS, SCENES = 256, 78, 4, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img/objects_world.png"))
    args = parser.parse_args()
    rows = -(-SCENES // COLUMNS)
    sheet = Image.new("RGB", (COLUMNS * TILE, rows * (TILE + TEXT_HEIGHT)), "white")
    draw = ImageDraw.Draw(sheet)
    for index in range(SCENES):
        rng = pair_rng(0, "train", index)
        scene = random_object_scene(rng)
        captions = [describe_object_scene(scene, rng).text for _ in range(2)]
        x, y = (index % COLUMNS) * TILE, (index // COLUMNS) * (TILE + TEXT_HEIGHT)
        sheet.paste(scene.image, (x, y))
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            draw.rectangle((x + x0, y + y0, x + x1 - 1, y + y1 - 1), outline=(255, 0, 255))
        lines = [line for text in captions for line in textwrap.wrap(f"“{text}”", 44)][:6]
        draw.multiline_text((x + 4, y + TILE + 3), "\n".join(lines), fill="black", spacing=1)
    sheet.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
