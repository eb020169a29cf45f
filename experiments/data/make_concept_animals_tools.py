"""Writes concept_animals_tools.jsonl: short English sentences labelled `animal` (the
sentence is about an animal) or `tool` (about a hand tool), for linear probes and concept
erasure (plugins/analyzers/probes.py, plugins/editors/leace.py).

Composed from word lists and sentence frames written for this project (no external corpus):
class-specific frames (what animals do, what tools are used for) and shared frames that
only the noun decides. Each line's "group" is its noun: sentences about the same noun are
near-copies for a probe, which can memorise nouns instead of reading the concept
(framework.concepts scores probes on unseen nouns and against a control task for that).
Deterministic (seed 0):
    python experiments/data/make_concept_animals_tools.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PER_CLASS = 400

ANIMALS = [
    "dog",
    "cat",
    "horse",
    "cow",
    "sheep",
    "goat",
    "pig",
    "rabbit",
    "fox",
    "wolf",
    "bear",
    "deer",
    "mouse",
    "rat",
    "squirrel",
    "owl",
    "eagle",
    "hawk",
    "crow",
    "sparrow",
    "duck",
    "goose",
    "swan",
    "frog",
    "toad",
    "snake",
    "lizard",
    "turtle",
    "salmon",
    "trout",
    "whale",
    "dolphin",
    "seal",
    "otter",
    "badger",
    "hedgehog",
    "lion",
    "tiger",
    "elephant",
    "giraffe",
    "zebra",
    "monkey",
    "camel",
    "donkey",
    "beaver",
    "moose",
]
TOOLS = [
    "hammer",
    "screwdriver",
    "wrench",
    "saw",
    "drill",
    "chisel",
    "file",
    "plane",
    "pliers",
    "spanner",
    "mallet",
    "axe",
    "hatchet",
    "shovel",
    "spade",
    "rake",
    "hoe",
    "trowel",
    "crowbar",
    "level",
    "tape measure",
    "utility knife",
    "clamp",
    "vise",
    "sander",
    "awl",
    "soldering iron",
    "hacksaw",
    "jigsaw",
    "pickaxe",
    "sledgehammer",
    "socket wrench",
    "hand plane",
    "wire cutter",
    "staple gun",
    "paint scraper",
    "putty knife",
    "pry bar",
    "torque wrench",
    "nail gun",
    "grinder",
    "router",
    "ratchet",
    "pitchfork",
    "scythe",
]

ANIMAL_FRAMES = [
    "The {x} slept in the shade all afternoon.",
    "A young {x} followed its mother across the field.",
    "The {x} was hungry and searched for food at dawn.",
    "We watched a {x} drink from the river.",
    "The {x} hid from the storm under the trees.",
    "Every spring the {x} raises its young near the water.",
    "A wild {x} ran past the old barn.",
    "The farmer said the {x} had been sick for a week.",
    "At night the {x} hunts quietly in the dark.",
    "The vet checked the {x} for fleas and ticks.",
    "A {x} can sense danger from far away.",
    "The children fed the {x} at the petting zoo.",
    "The {x} shook the rain from its coat.",
    "Nobody knew where the lost {x} had wandered.",
    "The {x} grew fat over the long summer.",
    "In winter the {x} moves to warmer ground.",
    "The old {x} limped slowly toward its den.",
    "A {x} was born at the zoo last night.",
]
TOOL_FRAMES = [
    "She tightened the bolt with a {x}.",
    "He kept the {x} in the red toolbox.",
    "The {x} made short work of the broken fence.",
    "You need a {x} to fix that cabinet door.",
    "The carpenter reached for his {x} again.",
    "A good {x} should feel balanced in the hand.",
    "He borrowed a {x} from the hardware store.",
    "The {x} slipped and scratched the table.",
    "Clean the {x} before you put it away.",
    "The mechanic used a {x} on the rusty engine.",
    "My grandfather's {x} still works after forty years.",
    "The blade of the {x} needs sharpening.",
    "The workshop wall was lined with every kind of {x}.",
    "She bought a new {x} for the garden shed.",
    "With a {x} he repaired the leaking pipe.",
    "The handle of the {x} cracked under pressure.",
    "Wear gloves when you use the {x}.",
    "The builder left his {x} on the scaffolding.",
]
SHARED_FRAMES = [
    "I saw a {x} at the market yesterday.",
    "There is a {x} in the picture on the wall.",
    "The book has a whole chapter about the {x}.",
    "My sister drew a {x} for her art class.",
    "Someone left a {x} near the front gate.",
    "The word {x} appears twice in the story.",
    "He could not stop talking about the {x}.",
    "We found a {x} behind the house this morning.",
]


def article(noun: str) -> str:
    return "an" if noun[0] in "aeio" else "a"  # "a utility knife"


def fill(frame: str, noun: str) -> str:
    text = frame.replace("a {x}", f"{article(noun)} {{x}}").replace(
        "A {x}", f"{article(noun).capitalize()} {{x}}"
    )
    return text.format(x=noun)


def sentences(nouns: list[str], frames: list[str], rng: random.Random) -> list[tuple[str, str]]:
    """(sentence, noun) pairs, PER_CLASS of them drawn from every frame x noun."""
    noun_of = {fill(f, n): n for f in frames + SHARED_FRAMES for n in nouns}
    pool = sorted(noun_of)
    rng.shuffle(pool)
    return [(t, noun_of[t]) for t in pool[:PER_CLASS]]


def main() -> None:
    rng = random.Random(0)
    rows = [
        {"text": t, "label": "animal", "group": n}
        for t, n in sentences(ANIMALS, ANIMAL_FRAMES, rng)
    ]
    rows += [
        {"text": t, "label": "tool", "group": n} for t, n in sentences(TOOLS, TOOL_FRAMES, rng)
    ]
    rng.shuffle(rows)
    out = Path(__file__).with_name("concept_animals_tools.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{out}: {len(rows)} sentences")


if __name__ == "__main__":
    main()
