"""Regenerate fuyou_ray/assets/corpus.txt, the small text corpus bundled for `make demo`.

The text is generated (no downloads, no third-party text): short sentences about a village, its people,
their trades, the weather and simple arithmetic, with enough regularity that a tiny byte-level GPT learns
spelling, common words and the sums within a minute. Deterministic: the same seed gives the same file.

    python examples/make_corpus.py [--kib 256] [--seed 7]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

NAMES = ["Ada", "Bram", "Cora", "Dmitri", "Elin", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kaya", "Leo"]
TRADES = ["baker", "smith", "weaver", "miller", "potter", "fisher", "carpenter", "gardener", "teacher"]
PLACES = ["the mill", "the harbour", "the market", "the old bridge", "the forge", "the orchard", "the school"]
THINGS = ["bread", "nails", "cloth", "flour", "bowls", "fish", "chairs", "apples", "lessons"]
WEATHER = ["rain", "fog", "sun", "wind", "snow", "frost"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FEELINGS = ["glad", "tired", "curious", "proud", "quiet", "hungry"]


def sentence(rng: random.Random) -> str:
    n, m = rng.sample(NAMES, 2)
    t = rng.randrange(len(TRADES))
    kind = rng.randrange(8)
    if kind == 0:
        return f"{n} is the {TRADES[t]} of the village and makes {THINGS[t]} at {rng.choice(PLACES)}."
    if kind == 1:
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        return f"{n} had {a} {THINGS[t]} and {m} brought {b} more, so {n} had {a + b} {THINGS[t]}."
    if kind == 2:
        day, weather, place = rng.choice(DAYS), rng.choice(WEATHER), rng.choice(PLACES)
        return f"On {day} there was {weather}, and {n} stayed near {place}."
    if kind == 3:
        a, b = rng.randrange(2, 13), rng.randrange(2, 13)
        return f"{a} times {b} is {a * b}."
    if kind == 4:
        return f"{n} walked to {rng.choice(PLACES)} to see {m}, who was {rng.choice(FEELINGS)}."
    if kind == 5:
        a, b = rng.randrange(20, 99), rng.randrange(1, 20)
        return f"{a} minus {b} is {a - b}."
    if kind == 6:
        return f"The {TRADES[t]} said: good {THINGS[t]} take time, and time takes care."
    return f"When the {rng.choice(WEATHER)} came, {n} and {m} shared {THINGS[t]} by the fire."


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kib", type=int, default=256)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent.parent / "fuyou_ray/assets/corpus.txt"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    parts: list[str] = []
    size = 0
    while size < args.kib * 1024:
        para = " ".join(sentence(rng) for _ in range(rng.randrange(3, 7))) + "\n\n"
        parts.append(para)
        size += len(para)
    Path(args.out).write_text("".join(parts), encoding="utf-8")
    print(f"wrote {size} bytes to {args.out}")


if __name__ == "__main__":
    main()
