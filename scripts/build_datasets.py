"""Build the reference corpus: training documents plus the held-out calibration and eval sets.

Three sources, each split deterministically so the held-out sets never share text with training:
  code  Python standard-library modules of the local CPython 3.11.7 (PSF-2.0); whole files are held out.
  math  procedurally generated arithmetic, word problems and algebra with worked answers (this script, seed 1234).
  chat  user/assistant dialogues rendered from templates in this script (seed 1234).
Math and chat "units" (one problem / one dialogue) are assigned to a split by the sha256 of their text, so an
identical unit can never land in two splits.

    python scripts/build_datasets.py            # writes data/calibration.jsonl, data/eval.jsonl, data/README.md
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from runtime.datasets import Sample  # noqa: E402  (the shipped JSONL schema)

STDLIB_DIR = Path("/root/.pyenv/versions/3.11.7/lib/python3.11")
STDLIB_EXCLUDE = {"this.py", "_sysconfigdata__linux_x86_64-linux-gnu.py", "__hello__.py", "antigravity.py"}
SEED = 1234
MIN_CHARS, MAX_CHARS = 200, 1500
CALIB_COUNTS = {"code": 43, "chat": 43, "math": 42}
EVAL_COUNTS = {"code": 34, "chat": 33, "math": 33}
HELD_OUT_CODE_FILES = 8  # per held-out split
UNIT_SEP = "\n\n"  # math and chat units never contain a blank line


@dataclass
class Corpus:
    """Everything the builder produces: training documents and the two held-out sample lists."""

    train_docs: list[tuple[str, str, str]]  # (category, source, text)
    train_code_files: list[str]
    held_out_code_files: dict[str, list[str]]
    train_unit_hashes: dict[str, list[str]]
    calibration: list[Sample]
    eval: list[Sample]


def sha256_text(text: str) -> str:
    """Hex sha256 of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def normalize_ws(text: str) -> str:
    """Collapse all whitespace runs to one space: the key for 'same text' checks."""
    return " ".join(text.split())


def unit_key(text: str) -> str:
    """Short hash of a whitespace-normalized unit, as stored in the training manifest."""
    return sha256_text(normalize_ws(text))[:16]


# ----------------------------------------------------------------------------------------------------------- code
def stdlib_files() -> list[Path]:
    """The stdlib modules used as the code source, sorted by name."""
    return sorted(p for p in STDLIB_DIR.glob("*.py") if p.name not in STDLIB_EXCLUDE)


def split_code_files(files: list[Path]) -> tuple[list[Path], list[Path], list[Path]]:
    """Rank files by a salted name hash; the first N are calibration source, the next N eval source, rest train."""
    ranked = sorted(files, key=lambda p: sha256_text("quantgate-split:" + p.name))
    n = HELD_OUT_CODE_FILES
    return ranked[:n], ranked[n:2 * n], sorted(ranked[2 * n:])


def code_chunks(path: Path, rng: random.Random) -> list[tuple[str, int, int]]:
    """Cut one file into contiguous chunks of MIN..MAX chars at blank-line boundaries: (text, first_line, last_line)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[tuple[int, int]] = []  # [start, end) line ranges separated by blank lines
    start = 0
    for i, line in enumerate(lines + [""]):
        if not line.strip():
            if i > start:
                blocks.append((start, i))
            start = i + 1
    chunks = []
    cur_start, cur_end, target = None, None, rng.randint(400, 1300)
    for b0, b1 in blocks:
        if cur_start is None:
            cur_start = b0
        cur_end = b1
        text = "\n".join(lines[cur_start:cur_end])
        if len(text) >= target:
            while len(text) > MAX_CHARS and cur_end - cur_start > 1:  # too long: drop trailing lines
                cur_end -= 1
                text = "\n".join(lines[cur_start:cur_end])
            if MIN_CHARS <= len(text) <= MAX_CHARS:
                chunks.append((text, cur_start + 1, cur_end))
            cur_start, cur_end, target = None, None, rng.randint(400, 1300)
    return chunks


def held_out_code(files: list[Path], count: int, rng: random.Random, taken: set[str]) -> list[tuple[str, str]]:
    """Pick `count` chunks round-robin across the held-out files: (text, source)."""
    pools = []
    for p in files:
        cands = code_chunks(p, rng)
        rng.shuffle(cands)
        pools.append([(t, f"cpython-3.11.7/Lib/{p.name}:{a}-{b}") for t, a, b in cands])
    out: list[tuple[str, str]] = []
    while len(out) < count:
        progressed = False
        for pool in pools:
            while pool and len(out) < count:
                text, src = pool.pop()
                key = normalize_ws(text)
                if key in taken:
                    continue
                taken.add(key)
                out.append((text, src))
                progressed = True
                break
        if not progressed:
            raise RuntimeError("held-out code files do not yield enough chunks")
    return out


# ----------------------------------------------------------------------------------------------------------- math
NAMES = ["Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena", "Mateo",
         "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Victor", "Wen", "Yara", "Zoe"]
ITEMS = [("apple", "apples"), ("pencil", "pencils"), ("book", "books"), ("marble", "marbles"), ("cookie", "cookies"),
         ("sticker", "stickers"), ("orange", "oranges"), ("card", "cards"), ("shell", "shells"), ("stamp", "stamps")]
SHOP_ITEMS = ["notebook", "sandwich", "ticket", "mug", "plant", "scarf", "lamp", "puzzle", "pen set", "backpack"]
VEHICLES = ["train", "car", "bus", "cyclist", "boat", "truck"]


def math_arith(rng: random.Random) -> str:
    """A one- or two-step arithmetic exercise with the working shown."""
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        return f"Compute {a} + {b}.\n{a} + {b} = {a + b}.\nAnswer: {a + b}"
    if kind == 1:
        a, b = rng.randint(100, 999), rng.randint(10, 99)
        return f"Compute {a} - {b}.\n{a} - {b} = {a - b}.\nAnswer: {a - b}"
    if kind == 2:
        a, b = rng.randint(11, 99), rng.randint(3, 19)
        tens, ones = a // 10 * 10, a % 10
        return (f"Compute {a} * {b}.\nSplit {a} into {tens} + {ones}.\n{tens} * {b} = {tens * b} and {ones} * {b} = "
                f"{ones * b}.\n{tens * b} + {ones * b} = {a * b}.\nAnswer: {a * b}")
    if kind == 3:
        b, q = rng.randint(3, 25), rng.randint(4, 60)
        r = rng.randint(0, b - 1)
        a = b * q + r
        tail = f" remainder {r}" if r else ""
        return f"Divide {a} by {b}.\n{b} * {q} = {b * q}, and {a} - {b * q} = {r}.\nAnswer: {q}{tail}"
    a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 12)
    return (f"Compute ({a} + {b}) * {c}.\nFirst the parentheses: {a} + {b} = {a + b}.\nThen {a + b} * {c} = "
            f"{(a + b) * c}.\nAnswer: {(a + b) * c}")


def math_word(rng: random.Random) -> str:
    """A short word problem with a worked answer."""
    kind = rng.randrange(6)
    n1, n2 = rng.sample(NAMES, 2)
    if kind == 0:
        s, p = rng.choice(ITEMS)
        a, b, c = rng.randint(5, 60), rng.randint(2, 30), rng.randint(1, 20)
        c = min(c, a + b)
        return (f"Problem: {n1} has {a} {p}. {n2} gives {n1} {b} more, and then {n1} gives away {c}. How many {p} "
                f"does {n1} have now?\nSolution: {a} + {b} = {a + b}. Then {a + b} - {c} = {a + b - c}.\n"
                f"Answer: {a + b - c} {p if a + b - c != 1 else s}")
    if kind == 1:
        item = rng.choice(SHOP_ITEMS)
        price, qty = rng.randint(2, 40), rng.randint(2, 9)
        paid = (price * qty // 10 + rng.randint(1, 5)) * 10
        return (f"Problem: A {item} costs {price} dollars. {n1} buys {qty} of them and pays with {paid} dollars. How "
                f"much change does {n1} get?\nSolution: The total is {qty} * {price} = {price * qty} dollars. The "
                f"change is {paid} - {price * qty} = {paid - price * qty} dollars.\n"
                f"Answer: {paid - price * qty} dollars")
    if kind == 2:
        v = rng.choice(VEHICLES)
        speed, hours = rng.randint(8, 120), rng.randint(2, 9)
        return (f"Problem: A {v} travels at {speed} km per hour for {hours} hours. How far does it go?\nSolution: "
                f"distance = speed * time = {speed} * {hours} = {speed * hours} km.\nAnswer: {speed * hours} km")
    if kind == 3:
        price, pct = rng.randint(2, 50) * 10, rng.choice([5, 10, 15, 20, 25, 30, 40, 50])
        off = price * pct // 100
        return (f"Problem: A jacket costs {price} dollars and is on sale for {pct}% off. What is the sale price?\n"
                f"Solution: {pct}% of {price} is {price} * {pct} / 100 = {off}. The sale price is {price} - {off} = "
                f"{price - off} dollars.\nAnswer: {price - off} dollars")
    if kind == 4:
        w, h = rng.randint(2, 40), rng.randint(2, 40)
        return (f"Problem: A garden is {w} m wide and {h} m long. What are its area and perimeter?\nSolution: area = "
                f"{w} * {h} = {w * h} square meters. perimeter = 2 * ({w} + {h}) = {2 * (w + h)} m.\nAnswer: area "
                f"{w * h} m^2, perimeter {2 * (w + h)} m")
    k = rng.randint(3, 5)
    mean = rng.randint(50, 95)
    vals = [mean + rng.randint(-12, 12) for _ in range(k - 1)]
    vals.append(mean * k - sum(vals))
    return (f"Problem: {n1} scored {', '.join(map(str, vals))} on {k} tests. What is the average score?\nSolution: "
            f"the sum is {' + '.join(map(str, vals))} = {sum(vals)}. Divide by {k}: {sum(vals)} / {k} = {mean}.\n"
            f"Answer: {mean}")


def _lin(a: int, b: int, var: str) -> str:
    """Render a*var + b compactly."""
    head = var if a == 1 else f"-{var}" if a == -1 else f"{a}{var}"
    return head if b == 0 else f"{head} + {b}" if b > 0 else f"{head} - {-b}"


def math_algebra(rng: random.Random) -> str:
    """Solve a linear equation or simplify fractions, step by step."""
    kind = rng.randrange(4)
    var = rng.choice("xyzn")
    if kind == 0:
        a, x, b = rng.randint(2, 12), rng.randint(-15, 20), rng.randint(-30, 30)
        c = a * x + b
        op = f"Subtract {b} from both sides" if b >= 0 else f"Add {-b} to both sides"
        return (f"Solve {_lin(a, b, var)} = {c}.\nStep 1: {op}: {a}{var} = {c - b}.\nStep 2: Divide both sides by "
                f"{a}: {var} = {x}.\nCheck: {a} * {x} + {b} = {c}.\nAnswer: {var} = {x}")
    if kind == 1:
        a, c = rng.randint(3, 12), rng.randint(1, 9)
        if a == c:
            a += 1
        x = rng.randint(-10, 12)
        b = rng.randint(-20, 20)
        d = a * x + b - c * x
        return (f"Solve {_lin(a, b, var)} = {_lin(c, d, var)}.\nStep 1: Subtract {c}{var} from both sides: "
                f"{_lin(a - c, b, var)} = {d}.\nStep 2: Move the constant: {a - c}{var} = {d - b}.\nStep 3: Divide by "
                f"{a - c}: {var} = {x}.\nAnswer: {var} = {x}")
    if kind == 2:
        p, q = rng.randint(1, 9), rng.randint(2, 12)
        r, s = rng.randint(1, 9), rng.randint(2, 12)
        total = Fraction(p, q) + Fraction(r, s)
        lcm = q * s // math.gcd(q, s)
        return (f"Add the fractions {p}/{q} + {r}/{s}.\nThe common denominator is {lcm}.\n{p}/{q} = {p * lcm // q}/"
                f"{lcm} and {r}/{s} = {r * lcm // s}/{lcm}.\nSum: {(p * lcm // q) + (r * lcm // s)}/{lcm}, which "
                f"simplifies to {total.numerator}/{total.denominator}.\nAnswer: {total}")
    a, b = rng.randint(2, 9), rng.randint(-9, 9)
    c = rng.randint(2, 6)
    return (f"Expand {c}({_lin(a, b, var)}).\nMultiply each term by {c}: {c} * {a}{var} = {c * a}{var} and {c} * {b} "
            f"= {c * b}.\nAnswer: {_lin(c * a, c * b, var)}")


def math_unit(rng: random.Random) -> str:
    """One math unit: arithmetic, a word problem or an algebra exercise."""
    return rng.choice([math_arith, math_word, math_word, math_algebra, math_algebra])(rng)


# ----------------------------------------------------------------------------------------------------------- chat
VARS = ["items", "names", "scores", "values", "words", "prices", "users", "rows", "files", "numbers"]
LANGS = ["Python", "Python 3"]
CITIES = ["Lisbon", "Oslo", "Kyoto", "Nairobi", "Lima", "Toronto", "Vienna", "Hanoi", "Cairo", "Dublin", "Perth"]
FOODS = [("pancakes", "flour, eggs, milk, a pinch of salt and a little butter", "Whisk everything, rest the batter "
          "10 minutes, then cook thin rounds in a hot pan for about a minute per side."),
         ("tomato soup", "tomatoes, an onion, garlic, olive oil, stock and salt", "Soften the onion and garlic in "
          "oil, add chopped tomatoes and stock, simmer 20 minutes, then blend."),
         ("fried rice", "cold cooked rice, eggs, peas, soy sauce, spring onions and oil", "Scramble the eggs first, "
          "then stir-fry the rice on high heat, add peas and soy sauce, and fold the eggs back in."),
         ("a simple salad", "lettuce, cucumber, tomatoes, olive oil, lemon juice and salt", "Chop the vegetables, "
          "whisk oil with lemon juice and salt, and toss just before serving."),
         ("banana bread", "ripe bananas, flour, sugar, butter, an egg and baking soda", "Mash the bananas, mix in "
          "melted butter, sugar and the egg, fold in flour and soda, and bake about 55 minutes at 175 C.")]
PLANTS = [("a cactus", "every two to three weeks", "lets the soil dry out completely"),
          ("a basil plant", "every one or two days", "likes moist soil and lots of sun"),
          ("a fern", "two or three times a week", "prefers humid air and indirect light"),
          ("an orchid", "about once a week", "should never sit in standing water"),
          ("a snake plant", "every two weeks", "tolerates low light and dry air")]


def _chat_programming(rng: random.Random) -> list[tuple[str, str]]:
    """Programming questions with concrete code in the answers."""
    v = rng.choice(VARS)
    n = rng.randint(2, 9)
    k = rng.choice(["reverse", "sort", "dedupe", "count", "file", "except", "comp", "dict", "join", "slice"])
    if k == "reverse":
        turns = [(f"How do I reverse a list called {v} in {rng.choice(LANGS)}?",
                  f"Use {v}.reverse() to reverse it in place, or {v}[::-1] to get a new reversed list and keep the "
                  f"original unchanged.")]
        if rng.random() < 0.6:
            turns.append(("Which one is faster?", f"Both are linear in the length of the list. {v}.reverse() avoids "
                          f"making a copy, so it uses less memory."))
    elif k == "sort":
        turns = [(f"I want to sort {v} from largest to smallest. What should I write?",
                  f"Write sorted({v}, reverse=True) for a new list, or {v}.sort(reverse=True) to sort in place.")]
        if rng.random() < 0.6:
            turns.append(("And if each element is a tuple and I want to sort by the second field?",
                          f"Pass a key function: sorted({v}, key=lambda t: t[1], reverse=True)."))
    elif k == "dedupe":
        turns = [(f"How can I remove duplicates from {v} but keep the order?",
                  f"Use a dict, since it keeps insertion order: list(dict.fromkeys({v})). A set would also remove "
                  f"duplicates, but it does not keep the order.")]
    elif k == "count":
        turns = [(f"What is the easiest way to count how often each element appears in {v}?",
                  f"Use collections.Counter: counts = Counter({v}). Then counts.most_common({n}) gives the {n} most "
                  f"frequent elements with their counts.")]
    elif k == "file":
        fname = rng.choice(["notes.txt", "data.csv", "log.txt", "config.ini", "input.txt"])
        turns = [(f"How do I read {fname} line by line?",
                  f"Open it with a with statement so it is closed automatically:\nwith open(\"{fname}\", "
                  f"encoding=\"utf-8\") as f:\n    for line in f:\n        print(line.rstrip())")]
        if rng.random() < 0.5:
            turns.append(("What if the file does not exist?", "open raises FileNotFoundError. Catch it with "
                          "try/except FileNotFoundError and print a helpful message."))
    elif k == "except":
        default = rng.choice(["0", "None", 'float("inf")'])
        turns = [("My program crashes with ZeroDivisionError. How do I handle it?",
                  f"Check the divisor first, or wrap the division in try/except ZeroDivisionError and return a "
                  f"default such as {default}.")]
    elif k == "comp":
        turns = [(f"Can you show me a list comprehension that squares the numbers from 1 to {n}?",
                  f"squares = [i * i for i in range(1, {n + 1})] gives "
                  f"{[i * i for i in range(1, n + 1)]}.")]
        if rng.random() < 0.5:
            turns.append(("How do I keep only the even squares?",
                          f"Add a condition: [i * i for i in range(1, {n + 1}) if i % 2 == 0] gives "
                          f"{[i * i for i in range(1, n + 1) if i % 2 == 0]}."))
    elif k == "dict":
        key = rng.choice(["name", "age", "city", "email", "id"])
        turns = [(f"How do I get the value for '{key}' from a dict without a KeyError?",
                  f"Use d.get('{key}'), which returns None when the key is missing, or d.get('{key}', default) to "
                  f"choose the fallback value.")]
    elif k == "join":
        sep = rng.choice([", ", "-", " ", "; "])
        turns = [(f"How do I join the strings in {v} with \"{sep}\" between them?",
                  f"Call the join method on the separator: \"{sep}\".join({v}). Every element must be a string, so "
                  f"use \"{sep}\".join(map(str, {v})) for numbers.")]
    else:
        turns = [(f"How do I get the first {n} elements of {v}?",
                  f"Slice it: {v}[:{n}]. Slicing never raises an error, so if {v} has fewer than {n} elements you "
                  f"just get all of them.")]
        if rng.random() < 0.5:
            turns.append((f"And the last {n}?", f"Use a negative start: {v}[-{n}:]."))
    return turns


def _chat_math(rng: random.Random) -> list[tuple[str, str]]:
    """Math help dialogues whose answers are computed, not canned."""
    k = rng.randrange(5)
    if k == 0:
        p, x = rng.choice([10, 15, 20, 25, 30, 40, 60, 75]), rng.randint(2, 90) * 4
        return [(f"What is {p}% of {x}?", f"{p}% means {p} per hundred, so {p}/100 * {x} = {p * x / 100:g}.")]
    if k == 1:
        r = rng.randint(1, 12)
        return [(f"What is the area of a circle with radius {r} cm?",
                 f"The area is pi * r^2 = pi * {r * r}, which is about {math.pi * r * r:.2f} square centimeters."),
                ("And the circumference?", f"The circumference is 2 * pi * r = {2 * r} * pi, about "
                 f"{2 * math.pi * r:.2f} cm.")]
    if k == 2:
        n = rng.choice([12, 18, 20, 24, 28, 30, 36, 42, 45, 48, 60, 72, 84, 90, 96, 100])
        fac, m, d = [], n, 2
        while m > 1:
            while m % d == 0:
                fac.append(d)
                m //= d
            d += 1
        return [(f"Is {n} a prime number?", f"No. {n} = {' * '.join(map(str, fac))}, so it has divisors other than "
                 f"1 and itself.")]
    if k == 3:
        a, b = rng.randint(12, 99), rng.randint(12, 99)
        return [(f"What is the greatest common divisor of {a} and {b}?",
                 f"Using the Euclidean algorithm the answer is {math.gcd(a, b)}."),
                ("What about the least common multiple?", f"lcm = {a} * {b} / gcd = {a * b // math.gcd(a, b)}.")]
    c = rng.randint(-10, 40)
    return [(f"How do I convert {c} degrees Celsius to Fahrenheit?",
             f"Multiply by 9/5 and add 32: {c} * 9/5 + 32 = {c * 9 / 5 + 32:g} degrees Fahrenheit.")]


def _chat_everyday(rng: random.Random) -> list[tuple[str, str]]:
    """Everyday questions: cooking, plants, travel, time and money."""
    k = rng.randrange(5)
    if k == 0:
        dish, ingr, steps = rng.choice(FOODS)
        return [(f"What do I need to make {dish}?", f"You need {ingr}."),
                ("How do I make it?", steps)]
    if k == 1:
        plant, freq, note = rng.choice(PLANTS)
        return [(f"How often should I water {plant}?", f"Water it {freq}. It {note}.")]
    if k == 2:
        city, days = rng.choice(CITIES), rng.randint(2, 10)
        return [(f"I am going to {city} for {days} days. What should I pack?",
                 f"For {days} days pack about {min(days, 7)} sets of clothes, comfortable shoes, a light jacket, "
                 f"chargers, your documents and any medicine you take. Check the weather forecast for {city} the day "
                 f"before you leave.")]
    if k == 3:
        h, m, add = rng.randint(0, 23), rng.choice([0, 15, 30, 45]), rng.randint(2, 14)
        end = (h + add) % 24
        return [(f"If it is {h:02d}:{m:02d} now, what time will it be in {add} hours?",
                 f"{h} + {add} = {h + add}" + (f", and {h + add} - 24 = {end}" if h + add >= 24 else "") +
                 f", so it will be {end:02d}:{m:02d}.")]
    income, rent = rng.randint(20, 60) * 100, rng.randint(5, 15) * 100
    return [(f"I earn {income} dollars a month and my rent is {rent}. How much is left?",
             f"{income} - {rent} = {income - rent} dollars are left for everything else."),
            ("How much should I save?", f"A common rule is to save about 20%, which would be "
             f"{(income - rent) * 20 // 100} dollars of what is left.")]


GREETINGS = ["", "Hi! ", "Hello. ", "Quick question: ", "Hey, ", "Good morning. "]
CLOSERS = [("Thanks!", "You're welcome."), ("Great, thank you.", "Glad I could help."),
           ("That makes sense.", "Happy to help. Ask again any time.")]


def chat_unit(rng: random.Random) -> str:
    """One dialogue with user/assistant turns, single newlines only."""
    turns = rng.choice([_chat_programming, _chat_math, _chat_everyday])(rng)
    turns = [(rng.choice(GREETINGS) + turns[0][0], turns[0][1])] + turns[1:]
    if rng.random() < 0.4:
        turns.append(rng.choice(CLOSERS))
    return "\n".join(f"User: {u}\nAssistant: {a}" for u, a in turns)


# ----------------------------------------------------------------------------------------------------------- split
def split_of(unit: str) -> str:
    """Deterministic split from the unit's hash: 4% calibration, 4% eval, 92% train."""
    bucket = int(sha256_text("quantgate-unit:" + normalize_ws(unit))[:8], 16) % 100
    return "calib" if bucket < 4 else "eval" if bucket < 8 else "train"


def pack(units: list[str], rng: random.Random) -> list[str]:
    """Join consecutive units with blank lines into samples of MIN..MAX characters."""
    out, cur, target = [], [], rng.randint(300, 1200)
    for u in units:
        if cur and len(UNIT_SEP.join(cur + [u])) > MAX_CHARS:
            if len(UNIT_SEP.join(cur)) >= MIN_CHARS:
                out.append(UNIT_SEP.join(cur))
            cur = []
        cur.append(u)
        if len(UNIT_SEP.join(cur)) >= target:
            out.append(UNIT_SEP.join(cur))
            cur, target = [], rng.randint(300, 1200)
    return out


def generated_splits(make, n_units: int, rng: random.Random) -> dict[str, list[str]]:
    """Generate unique units and bucket them by hash into train / calib / eval."""
    seen, buckets = set(), {"train": [], "calib": [], "eval": []}
    for _ in range(n_units):
        u = make(rng)
        key = normalize_ws(u)
        if key in seen:
            continue
        seen.add(key)
        buckets[split_of(u)].append(u)
    return buckets


def build(n_math_units: int = 20000, n_chat_units: int = 20000) -> Corpus:
    """Build the whole corpus deterministically (seeded, no clock, sorted file lists)."""
    rng = random.Random(SEED)
    calib_files, eval_files, train_files = split_code_files(stdlib_files())
    taken: set[str] = set()
    held = {"calib": held_out_code(calib_files, CALIB_COUNTS["code"], rng, taken),
            "eval": held_out_code(eval_files, EVAL_COUNTS["code"], rng, taken)}
    train_docs = [("code", f"cpython-3.11.7/Lib/{p.name}", p.read_text(encoding="utf-8")) for p in train_files]
    unit_hashes: dict[str, list[str]] = {}
    samples: dict[str, dict[str, list[tuple[str, str]]]] = {"calib": {}, "eval": {}}
    for cat, make, n, src in (("math", math_unit, n_math_units, "generated: scripts/build_datasets.py math_unit"),
                              ("chat", chat_unit, n_chat_units, "generated: scripts/build_datasets.py chat_unit")):
        b = generated_splits(make, n, random.Random(f"{SEED}-{cat}"))
        unit_hashes[cat] = sorted({unit_key(u) for u in b["train"]})
        train_docs += [(cat, f"{src} seed={SEED}", t) for t in pack(b["train"], rng)]
        for split, counts in (("calib", CALIB_COUNTS), ("eval", EVAL_COUNTS)):
            packed = pack(b[split], rng)
            if len(packed) < counts[cat]:
                raise RuntimeError(f"not enough {cat} units for {split}")
            samples[split][cat] = [(t, f"{src} seed={SEED}") for t in packed[:counts[cat]]]
    samples["calib"]["code"], samples["eval"]["code"] = held["calib"], held["eval"]

    def to_samples(split: str, prefix: str) -> list[Sample]:
        out = []
        for cat in ("code", "chat", "math"):
            out += [Sample(f"{prefix}-{cat}-{i:03d}", cat, t, s) for i, (t, s) in enumerate(samples[split][cat])]
        return out

    return Corpus(train_docs=train_docs, train_code_files=[p.name for p in train_files],
                  held_out_code_files={"calibration": [p.name for p in calib_files],
                                       "eval": [p.name for p in eval_files]},
                  train_unit_hashes=unit_hashes, calibration=to_samples("calib", "calib"),
                  eval=to_samples("eval", "eval"))


def check(corpus: Corpus) -> list[str]:
    """Disjointness and size checks; returns a list of human-readable check results (raises on failure)."""
    train_norm = {normalize_ws(t) for _, _, t in corpus.train_docs}
    train_units = {c: set(h) for c, h in corpus.train_unit_hashes.items()}
    cal = {normalize_ws(s.text) for s in corpus.calibration}
    ev = {normalize_ws(s.text) for s in corpus.eval}
    assert len(cal) == len(corpus.calibration) and len(ev) == len(corpus.eval), "duplicate held-out samples"
    assert not cal & ev, "calibration and eval overlap"
    assert not (cal | ev) & train_norm, "held-out sample equals a training document"
    for s in corpus.calibration + corpus.eval:
        assert MIN_CHARS <= len(s.text) <= MAX_CHARS, (s.id, len(s.text))
        if s.category == "code":
            assert s.source.split("/")[-1].split(":")[0] not in corpus.train_code_files, s.id
        else:
            for u in s.text.split(UNIT_SEP):
                assert unit_key(u) not in train_units[s.category], (s.id, u)
    code_train = "\n".join(t for c, _, t in corpus.train_docs if c == "code")
    for s in corpus.calibration + corpus.eval:
        if s.category == "code":
            assert s.text not in code_train, f"{s.id} occurs verbatim in training code"
    return ["calibration and eval share no sample (whitespace-normalized)",
            "no held-out sample equals a training document",
            "code samples come only from held-out files and none occurs verbatim in the training code",
            "no math/chat unit (problem or dialogue) of a held-out sample is a training unit",
            f"every sample is {MIN_CHARS}-{MAX_CHARS} characters, ids unique"]


def write_jsonl(path: Path, samples: list[Sample]) -> None:
    """Write samples as JSONL with keys id, category, text, source (UTF-8, one object a line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps({"id": s.id, "category": s.category, "text": s.text, "source": s.source},
                               ensure_ascii=False) + "\n")


def length_table(samples: list[Sample]) -> str:
    """Markdown rows: count and char-length stats per category."""
    rows = []
    for cat in ("code", "chat", "math"):
        ls = [len(s.text) for s in samples if s.category == cat]
        rows.append(f"| {cat} | {len(ls)} | {min(ls)} | {int(statistics.median(ls))} | {max(ls)} |")
    ls = [len(s.text) for s in samples]
    rows.append(f"| all | {len(ls)} | {min(ls)} | {int(statistics.median(ls))} | {max(ls)} |")
    return "\n".join(rows)


def datasheet(corpus: Corpus, checks: list[str]) -> str:
    """Render data/README.md from the built corpus (numbers are computed, not typed)."""
    tr = {c: sum(1 for d in corpus.train_docs if d[0] == c) for c in ("code", "chat", "math")}
    trc = {c: sum(len(d[2]) for d in corpus.train_docs if d[0] == c) for c in ("code", "chat", "math")}
    hdr = "| category | samples | min chars | median chars | max chars |\n| --- | --- | --- | --- | --- |\n"
    return f"""# Datasets: calibration and evaluation text

Two JSONL files, one object per line with the fields `id`, `category` (`code`, `chat`, `math`), `text`, `source`:

- `calibration.jsonl`: {len(corpus.calibration)} samples for importance matrices and calibration.
- `eval.jsonl`: {len(corpus.eval)} held-out samples for perplexity / quality checks.

Both are written by `python scripts/build_datasets.py` (deterministic: seed {SEED}, sorted file lists, no clock), which
also builds the training corpus of the reference model in `models/reference/` (`scripts/train_reference_model.py`
imports the same builder). Load them with `runtime.datasets.load_dataset`.

## Sources and licenses

| category | source | license |
| --- | --- | --- |
| code | Python standard-library modules `Lib/*.py` of CPython 3.11.7 (the local pyenv install) | PSF-2.0 (Python Software Foundation License) |
| math | generated by `math_unit()` in `scripts/build_datasets.py`: arithmetic with working, word problems (shopping, distance, discounts, areas, averages), linear equations, fraction sums, expansions | generated by this project (MIT, same as quantgate) |
| chat | generated by `chat_unit()` in `scripts/build_datasets.py`: `User:`/`Assistant:` dialogues from templates about Python programming, math help and everyday questions (cooking, plants, travel, time, budgets); numeric answers are computed | generated by this project (MIT) |

Each code sample's `source` is `cpython-3.11.7/Lib/FILE:FIRST-LAST` (line range). Excluded from the code source:
{", ".join(f"`{n}`" for n in sorted(STDLIB_EXCLUDE))} (generated, obfuscated or trivial).

## How the splits are made

- **code**: files are ranked by `sha256("quantgate-split:" + name)`; the first {HELD_OUT_CODE_FILES} files are the
  calibration source ({", ".join(corpus.held_out_code_files["calibration"])}), the next {HELD_OUT_CODE_FILES} the eval
  source ({", ".join(corpus.held_out_code_files["eval"])}); the other {len(corpus.train_code_files)} files are training
  text. Held-out files are cut at blank lines into contiguous chunks of {MIN_CHARS}-{MAX_CHARS} characters, and chunks
  are drawn round-robin across the files.
- **math / chat**: each unit (one exercise or one dialogue) is generated from a seeded RNG, de-duplicated, and sent to
  a split by `sha256("quantgate-unit:" + whitespace-normalized text) % 100` (<4 calibration, <8 eval, rest training),
  so the same unit can never be in two splits. Units of a split are packed, separated by one blank line, into samples
  of {MIN_CHARS}-{MAX_CHARS} characters.
- The training corpus: {tr["code"]} code files ({trc["code"]:,} chars), {tr["math"]} math documents
  ({trc["math"]:,} chars), {tr["chat"]} chat documents ({trc["chat"]:,} chars). Its manifest
  (`models/reference/train_manifest.json`) lists the sha256 of every training document, the training file names and
  the 16-hex-digit hashes of every training math/chat unit, so tests check disjointness without a second copy.

## Counts and lengths (characters)

calibration.jsonl

{hdr}{length_table(corpus.calibration)}

eval.jsonl

{hdr}{length_table(corpus.eval)}

## Checks done at build time (the build fails if one does not hold)

{chr(10).join("- " + c for c in checks)}

`tests/validation/test_datasets.py` re-checks counts, balance, id uniqueness, disjointness and the training manifest.

## Known limitations

- Math and chat are templated: held-out samples are new instances (different numbers, names, combinations), not new
  templates, so perplexity on them measures in-distribution fit. Code held out by whole file is the harder test.
- All text is English and Python; it is sized for a ~5M-parameter test model, not for judging large models.
"""


def main(argv: list[str] | None = None) -> int:
    """Build and write data/calibration.jsonl, data/eval.jsonl and data/README.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "data")
    args = ap.parse_args(argv)
    corpus = build()
    checks = check(corpus)
    write_jsonl(args.out / "calibration.jsonl", corpus.calibration)
    write_jsonl(args.out / "eval.jsonl", corpus.eval)
    (args.out / "README.md").write_text(datasheet(corpus, checks), encoding="utf-8")
    print(f"wrote {len(corpus.calibration)} calibration and {len(corpus.eval)} eval samples; "
          f"{len(corpus.train_docs)} training documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
