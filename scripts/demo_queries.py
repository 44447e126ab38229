"""Pick the demo's spoken queries from an objects-world manifest: the first caption that names an animal,
one that names a food and one that names a vehicle (each of another image), printed as wav paths."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from training.vocabulary import by_name

# Travel & Places holds places and weather too; these are the things that carry people.
VEHICLES = {"steam train", "railway carriage", "high speed train", "train", "subway", "tram", "monorail", "bus",
            "minibus", "ambulance", "fire truck", "police car", "taxi", "car", "camper van", "pickup truck", "truck",
            "lorry", "tractor", "race car", "motorcycle", "scooter", "rickshaw", "bike", "kick scooter", "sailboat",
            "canoe", "speedboat", "cruise ship", "motor boat", "ship", "plane", "small plane", "helicopter",
            "cable car", "rocket"}


# Animals & Nature holds plants and traces too; a demo that promises an animal should name a creature.
NOT_CREATURES = {"paw prints", "feather", "wing", "shell", "coral", "spider web", "nest", "nest with eggs", "mushroom",
                 "bouquet", "cherry blossom", "lotus", "rose", "wilted flower", "hibiscus", "sunflower", "yellow flower",
                 "tulip", "hyacinth", "seedling", "potted plant", "pine tree", "tree", "palm tree", "cactus", "wheat",
                 "herb", "clover", "maple leaf", "fallen leaves"}


def named_groups(entry: dict, group_of: dict[str, str]) -> set[str]:
    """The groups of the things a caption names ("vehicles" for a vehicle)."""
    named = set()
    for obj in entry.get("objects") or []:
        if obj.get("mention") is None or obj.get("category") is None:
            continue
        category = obj["category"]
        if category in VEHICLES:
            named.add("vehicles")
        elif category not in NOT_CREATURES:
            named.add(group_of.get(category, ""))
    return named


def pick(manifest_path: str, wanted=("animals", "food", "vehicles")) -> list[str]:
    manifest = json.loads(Path(manifest_path).read_text())
    group_of = {name: category.group for name, category in by_name().items()}
    audio_dir = Path(manifest_path).parent / manifest["audio_base_path"]
    chosen, images = [], set()
    for group in wanted:
        for entry in manifest["data"]:
            if entry["image"] not in images and group in named_groups(entry, group_of):
                chosen.append(str(audio_dir / entry["wav"]))
                images.add(entry["image"])
                break
        else:
            raise SystemExit(f"{manifest_path}: no caption names {group}")
    return chosen


if __name__ == "__main__":
    print("\n".join(pick(sys.argv[1])))
