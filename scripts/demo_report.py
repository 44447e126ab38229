"""Print the demo's queries with their hits, marking the image each caption was spoken about, and
draw the hits as a picture (one row per query)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw


def main(manifest_path: str, hits_path: str, picture_path: str) -> None:
    manifest = json.loads(Path(manifest_path).read_text())
    by_wav = {Path(e["wav"]).name: e for e in manifest["data"]}
    queries = json.loads(Path(hits_path).read_text())["queries"]
    thumb, rows = 128, []
    for query in queries:
        entry = by_wav[Path(query["audio"]).name]
        truth = Path(entry["image"]).name
        print(f'\nquery: "{entry["asr_text"]}"  (voice {entry["speaker"]})')
        if "error" in query:
            print(f"  error: {query['error']}")
            continue
        print(f"  {'rank':>4}  {'MISA':>7}  {'SISA':>7}  image")
        for rank, hit in enumerate(query["hits"], 1):
            mark = "  <- the image this caption describes" if Path(hit["uri"]).name == truth else ""
            print(f"  {rank:>4}  {hit['score']:>7.2f}  {hit['stage1_score']:>7.2f}  {Path(hit['uri']).name}{mark}")
        t = query.get("timings_ms", {})
        print(f"  server time {t.get('total', float('nan')):.1f} ms")
        rows.append((truth, [hit["uri"] for hit in query["hits"]]))
    if not rows:
        return
    sheet = Image.new("RGB", (thumb * 5 + 12 * 5, (thumb + 12) * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (truth, uris) in enumerate(rows):
        for c, uri in enumerate(uris[:5]):
            x, y = c * (thumb + 12) + 6, r * (thumb + 12) + 6
            sheet.paste(Image.open(uri).convert("RGB").resize((thumb, thumb)), (x, y))
            if Path(uri).name == truth:
                draw.rectangle([x - 4, y - 4, x + thumb + 3, y + thumb + 3], outline=(0, 200, 0), width=4)
    sheet.save(picture_path)
    print(f"\nthe hits as a picture (one row per query, the described image boxed in green): {picture_path}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
