"""Write tilt/assets/openings_train.jsonl and tilt/assets/openings_heldout.jsonl: the frontier task's prompts.

Every opening is composed here, from the hand-written templates and word lists below, by a seeded
``random.Random``; nothing is copied from any corpus. Openings are short, mostly neutral first halves of a
sentence (a review, a diary entry, a story, a note) that a model continues; VADER scores the continuation, so a
neutral opening leaves it room to move either way. Re-running this script rewrites both files byte for byte
(tests/test_frontier.py checks that the shipped files are its output).

    python benchmarks/make_openings.py            # rewrites the two files
    python benchmarks/make_openings.py --check    # exits 1 if the shipped files differ

Licence: the templates, word lists and generated openings are part of tilt and under its licence (see
pyproject.toml); the one provenance row is written to tilt/assets/openings_provenance.jsonl.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20261129
TRAIN, HELDOUT = 240, 120

WORDS = {
    "thing": ["movie", "book", "album", "restaurant", "hotel", "phone", "laptop", "bike", "museum", "concert", "play",
              "podcast", "video game", "coffee shop", "bakery", "train ride", "ferry", "camera", "jacket", "backpack",
              "board game", "novel", "documentary", "exhibition", "course", "app", "guidebook", "kettle", "desk lamp",
              "garden centre"],
    "person": ["my neighbour", "my sister", "my brother", "our teacher", "the manager", "my friend", "the driver",
               "my grandmother", "the new colleague", "the landlord", "the waiter", "my cousin", "the doctor",
               "the coach", "our guide"],
    "place": ["the station", "the library", "the market", "the harbour", "the old town", "the office", "the park",
              "the village hall", "the airport", "the school", "the clinic", "the beach", "the bus stop",
              "the hardware store", "the post office"],
    "time": ["on Monday", "last night", "this morning", "on Saturday afternoon", "after lunch", "in early spring",
             "two weeks ago", "yesterday evening", "at dawn", "over the weekend", "in the autumn", "on a rainy Tuesday"],
    "weather": ["grey", "windy", "quiet", "warm", "cold", "cloudy", "still", "foggy", "humid", "clear"],
    "object": ["a letter", "a parcel", "an old photograph", "a set of keys", "a notebook", "a map", "a small box",
               "a receipt", "a ticket", "a postcard", "a recipe card", "a phone number"],
    "verb": ["opened", "visited", "tried", "read", "watched", "used", "ordered", "tested", "bought", "borrowed"],
    "detail": ["the price", "the service", "the design", "the ending", "the first chapter", "the sound", "the menu",
               "the instructions", "the packaging", "the opening scene", "the battery", "the staff", "the lighting",
               "the music", "the waiting time"],
}

TEMPLATES = [
    "I {verb} the {thing} {time}, and",
    "The {thing} we {verb} {time} was",
    "Honestly, {detail} of the {thing}",
    "When {person} recommended the {thing}, I",
    "My review of the {thing}: {detail}",
    "{time_cap}, {person} told me that {detail}",
    "It was a {weather} day at {place} when",
    "{time_cap} I found {object} at {place}, and",
    "The story begins at {place}, where {person}",
    "Dear diary, {time} {person} and I",
    "After a {weather} week, the {thing}",
    "Note to self about the {thing}: {detail}",
    "At {place} {time}, the queue for the {thing}",
    "{person_cap} handed me {object} and said",
    "The first thing I noticed about the {thing} was",
    "We arrived at {place} {time} and",
    "Three things about the {thing}. First,",
    "I had no expectations for the {thing}, but",
    "Walking past {place} {time}, I saw {person}",
    "The {thing} arrived {time}; {detail}",
]


def _fill(template: str, rng: random.Random) -> str:
    values = {key: rng.choice(words) for key, words in WORDS.items()}
    values["time_cap"] = values["time"][0].upper() + values["time"][1:]
    values["person_cap"] = values["person"][0].upper() + values["person"][1:]
    return template.format(**values)


def openings(total: int, seed: int = SEED) -> list[str]:
    """``total`` distinct openings: templates taken in turn, words drawn from one seeded generator."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    i = 0
    while len(out) < total:
        text = _fill(TEMPLATES[i % len(TEMPLATES)], rng)
        i += 1
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def rendered() -> dict[str, str]:
    """File name -> exact file text of the two prompt files and the provenance row. The held-out openings are
    every third one of the shuffled list, so that both splits cover every template."""
    texts = openings(TRAIN + HELDOUT)
    rng = random.Random(SEED + 1)
    rng.shuffle(texts)
    heldout = texts[::3][:HELDOUT]
    held = set(heldout)
    train = [t for t in texts if t not in held][:TRAIN]
    prov = {"provenance": "composed by benchmarks/make_openings.py from hand-written templates and word lists with "
                          f"random.Random({SEED}); no corpus text", "license": "same as tilt",
            "files": {"openings_train.jsonl": len(train), "openings_heldout.jsonl": len(heldout)}}

    def jsonl(rows):
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    return {
        "openings_train.jsonl": jsonl({"prompt": t} for t in train),
        "openings_heldout.jsonl": jsonl({"prompt": t} for t in heldout),
        "openings_provenance.jsonl": jsonl([prov]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing them")
    args = p.parse_args(argv)
    assets = Path(__file__).resolve().parent.parent / "tilt" / "assets"
    for name, text in rendered().items():
        path = assets / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                print(f"{path} differs from the generator's output", file=sys.stderr)
                return 1
        else:
            path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
