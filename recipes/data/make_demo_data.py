#!/usr/bin/env python3
"""Generate the ftlaunch demo data set: date extraction into strict ISO format.

Task: the user gives a short sentence that mentions one calendar date written the
way people write dates ("7 March 2024", "March 7th, 2024", "Mar. 7, 2024", ...);
the assistant must answer with that date as ``YYYY-MM-DD`` and nothing else.

Why this task for the demo: SmolLM2-135M-Instruct mostly knows what a date is but
does not follow the strict output format (it chats, keeps the month name, or picks
the wrong digits), so exact match before fine-tuning is near zero. The mapping is
deterministic and local (month name -> number, zero-pad the day, copy the year),
so LoRA learns it in well under a hundred steps on CPU, and exact match on the
stripped answer is an unambiguous metric.

Output is OpenAI-style chat JSONL, one object per line::

    {"messages": [{"role": "user", "content": "..."},
                  {"role": "assistant", "content": "2024-03-07"}]}

Train and eval never share a (date, sentence) pair, and eval uses distinct dates.
Deterministic for a given ``--seed``; stdlib only (no torch).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

INSTRUCTION = "Extract the date and answer only with it as YYYY-MM-DD."

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]
# Conventional abbreviations; May/June/July are usually not abbreviated.
MONTH_ABBR = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]

NAMES = [
    "Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Greta", "Hiro", "Ines", "Jonas",
    "Kavya", "Liam", "Mei", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq",
]

# Each template holds exactly one {date}; the other slots add surface variety so the
# model has to find the date rather than memorise a position.
TEMPLATES = [
    "{name}'s flight to {city} leaves on {date}.",
    "The contract was signed on {date} in {city}.",
    "Our team meeting moved to {date} because of the holiday.",
    "{name} was born on {date}.",
    "The invoice is due {date}, please pay on time.",
    "On {date}, {name} opened a bakery in {city}.",
    "Reminder: the {event} takes place on {date}.",
    "{name} moved to {city} on {date}.",
    "The {event} was postponed to {date}.",
    "Please send the report to {name} before {date}.",
    "We got married in {city} on {date}.",
    "The last day of the {event} is {date}.",
]

CITIES = ["Lyon", "Osaka", "Lima", "Oslo", "Cairo", "Quebec", "Porto", "Seoul", "Nairobi", "Austin"]
EVENTS = ["conference", "workshop", "board meeting", "concert", "school trip", "product launch"]


def ordinal(day: int) -> str:
    """English ordinal suffix: 1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, ..."""
    if 11 <= day % 100 <= 13:
        return f"{day}th"
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def render_date(date: dt.date, style: int) -> str:
    """Write ``date`` the way a person might, in one of six styles."""
    month, abbr, d, y = MONTHS[date.month - 1], MONTH_ABBR[date.month - 1], date.day, date.year
    return [
        f"{month} {d}, {y}",            # March 7, 2024
        f"{d} {month} {y}",             # 7 March 2024
        f"{month} {ordinal(d)}, {y}",   # March 7th, 2024
        f"the {ordinal(d)} of {month} {y}",  # the 7th of March 2024
        f"{abbr}. {d}, {y}" if abbr != month else f"{month} {d}, {y}",  # Mar. 7, 2024
        f"{d} {abbr} {y}",              # 7 Mar 2024
    ][style]


N_STYLES = 6


def random_date(rng: random.Random) -> dt.date:
    """A uniformly random valid date between 1950-01-01 and 2049-12-31."""
    start = dt.date(1950, 1, 1).toordinal()
    end = dt.date(2049, 12, 31).toordinal()
    return dt.date.fromordinal(rng.randint(start, end))


def make_example(rng: random.Random, date: dt.date) -> dict:
    """One chat example for ``date`` with a random sentence and date style."""
    sentence = rng.choice(TEMPLATES).format(
        name=rng.choice(NAMES),
        city=rng.choice(CITIES),
        event=rng.choice(EVENTS),
        date=render_date(date, rng.randrange(N_STYLES)),
    )
    # A sentence-initial "the 7th of ..." would read oddly but is still unambiguous.
    sentence = sentence[0].upper() + sentence[1:]
    return {
        "messages": [
            {"role": "user", "content": f"{INSTRUCTION}\n{sentence}"},
            {"role": "assistant", "content": date.isoformat()},
        ]
    }


def make_split(rng: random.Random, n: int, used: set[dt.date]) -> list[dict]:
    """``n`` examples on dates not in ``used`` (which is updated)."""
    out = []
    while len(out) < n:
        date = random_date(rng)
        if date in used:
            continue
        used.add(date)
        out.append(make_example(rng, date))
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as compact JSONL (one object per line, trailing newline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "demo")
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-eval", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    # Separate streams so changing --n-train does not change the eval set.
    used: set[dt.date] = set()
    eval_rows = make_split(random.Random(f"eval-{args.seed}"), args.n_eval, used)
    train_rows = make_split(random.Random(f"train-{args.seed}"), args.n_train, used)

    write_jsonl(args.out_dir / "train.jsonl", train_rows)
    write_jsonl(args.out_dir / "eval.jsonl", eval_rows)
    print(f"wrote {len(train_rows)} train and {len(eval_rows)} eval examples to {args.out_dir}")


if __name__ == "__main__":
    main()
