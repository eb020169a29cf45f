"""Writes concept_gender.jsonl: short English sentences about one person, labelled `male`
or `female` by the grammatical gender of that person (a gendered noun or a given name and,
in half of the frames, the pronoun that refers back to them), for linear probes and
concept erasure (plugins/analyzers/probes.py, plugins/editors/leace.py).

Gender is the concept LEACE and its predecessors were built to erase (Ravfogel et al.,
2020, INLP; Belrose et al., 2023, LEACE). Beside experiments/data/concept_animals_tools
it tests the other end of the range: a concept carried by one crisp direction shared by
every word of a class, where the animal/tool category is diffuse and each noun carries its
own part of it.

Composed from word lists and sentence frames written for this project (no external
corpus). Every frame fits either class, so only the person tells the class. Each line's
"group" is its person word, so a probe can be scored on words it never saw
(framework.concepts). Deterministic (seed 0):
    python experiments/data/make_concept_gender.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PER_CLASS = 400

# (male, female) pairs, so the two classes hold the same kinds of words.
NOUN_PAIRS = [
    ("man", "woman"),
    ("boy", "girl"),
    ("father", "mother"),
    ("son", "daughter"),
    ("brother", "sister"),
    ("husband", "wife"),
    ("uncle", "aunt"),
    ("nephew", "niece"),
    ("grandfather", "grandmother"),
    ("grandson", "granddaughter"),
    ("king", "queen"),
    ("prince", "princess"),
    ("duke", "duchess"),
    ("lord", "lady"),
    ("emperor", "empress"),
    ("monk", "nun"),
    ("priest", "priestess"),
    ("actor", "actress"),
    ("waiter", "waitress"),
    ("groom", "bride"),
    ("gentleman", "lady"),
    ("schoolboy", "schoolgirl"),
    ("stepfather", "stepmother"),
    ("godfather", "godmother"),
    ("widower", "widow"),
    ("landlord", "landlady"),
    ("headmaster", "headmistress"),
    ("host", "hostess"),
    ("steward", "stewardess"),
    ("fiance", "fiancee"),
    ("bachelor", "spinster"),
    ("sultan", "sultana"),
    ("baron", "baroness"),
    ("count", "countess"),
    ("hero", "heroine"),
    ("postman", "postwoman"),
    ("policeman", "policewoman"),
    ("salesman", "saleswoman"),
    ("chairman", "chairwoman"),
    ("fisherman", "fisherwoman"),
]

NAME_PAIRS = [
    ("John", "Mary"),
    ("James", "Anna"),
    ("Robert", "Linda"),
    ("Michael", "Susan"),
    ("William", "Sarah"),
    ("David", "Karen"),
    ("Richard", "Nancy"),
    ("Thomas", "Lisa"),
    ("Charles", "Emily"),
    ("Daniel", "Laura"),
    ("Matthew", "Helen"),
    ("George", "Alice"),
    ("Edward", "Grace"),
    ("Henry", "Rachel"),
    ("Peter", "Julia"),
    ("Paul", "Emma"),
    ("Mark", "Sophie"),
    ("Steven", "Hannah"),
    ("Andrew", "Olivia"),
    ("Kevin", "Chloe"),
    ("Brian", "Megan"),
    ("Frank", "Diana"),
    ("Samuel", "Rose"),
    ("Arthur", "Clara"),
    ("Oliver", "Lucy"),
    ("Harry", "Ellen"),
    ("Jack", "Kate"),
    ("Walter", "Martha"),
    ("Albert", "Jane"),
    ("Victor", "Irene"),
    ("Hugo", "Nora"),
    ("Simon", "Fiona"),
    ("Luke", "Ruth"),
    ("Adam", "Eva"),
    ("Ivan", "Olga"),
    ("Carlos", "Maria"),
    ("Ahmed", "Fatima"),
    ("Hans", "Greta"),
    ("Pierre", "Claire"),
    ("Marco", "Giulia"),
]

MALE = [m for m, _ in NOUN_PAIRS] + [m for m, _ in NAME_PAIRS]
FEMALE = list(dict.fromkeys(f for _, f in NOUN_PAIRS)) + [f for _, f in NAME_PAIRS]

# {x}: the person ("the man", or a name); {p}/{o}: the pronoun that refers back (he/she,
# his/her). Half of the frames name the person only.
FRAMES = [
    "{x} walked into the kitchen and sat down.",
    "Yesterday {x} bought bread at the market.",
    "{x} read the letter twice before answering it.",
    "Everyone waited while {x} finished the speech.",
    "{x} opened the window to let the cold air in.",
    "The neighbours invited {x} to dinner on Sunday.",
    "{x} was late for the train again this morning.",
    "Nobody expected {x} to win the race.",
    "{x} planted roses along the garden wall.",
    "A stranger asked {x} for directions to the station.",
    "{x} smiled because {p} had finished the work early.",
    "{x} said that {p} would return before the winter.",
    "{x} lost {o} keys somewhere in the park.",
    "{x} told the children that {p} was very tired.",
    "{x} packed {o} bag and left before dawn.",
    "{x} sang while {p} washed the dishes.",
    "{x} thanked the doctor and shook {o} head.",
    "When {x} came home, {p} found the door open.",
    "{x} wrote to {o} cousin every week.",
    "{x} laughed when {p} heard the news.",
]

PRONOUNS = {"male": ("he", "his"), "female": ("she", "her")}


def person(word: str) -> str:
    """A name as it is, a noun with its article."""
    return word if word[0].isupper() else f"the {word}"


def fill(frame: str, word: str, label: str) -> str:
    subject, possessive = PRONOUNS[label]
    text = frame.format(x=person(word), p=subject, o=possessive)
    return text[0].upper() + text[1:]


def sentences(words: list[str], label: str, rng: random.Random) -> list[tuple[str, str]]:
    word_of = {fill(f, w, label): w for f in FRAMES for w in words}
    pool = sorted(word_of)
    rng.shuffle(pool)
    return [(t, word_of[t]) for t in pool[:PER_CLASS]]


def main() -> None:
    rng = random.Random(0)
    rows = [{"text": t, "label": "male", "group": w} for t, w in sentences(MALE, "male", rng)]
    rows += [
        {"text": t, "label": "female", "group": w} for t, w in sentences(FEMALE, "female", rng)
    ]
    rng.shuffle(rows)
    out = Path(__file__).with_name("concept_gender.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{out}: {len(rows)} sentences, {len(MALE)} male and {len(FEMALE)} female words")


if __name__ == "__main__":
    main()
