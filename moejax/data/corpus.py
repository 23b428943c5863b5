"""A deterministic, seeded synthetic corpus: a multi-domain toy language plus algorithmic tasks.

Nothing is downloaded. Every generator takes ``(split, n, seed)`` and returns the same examples on
every machine. Domains use disjoint content words and their own sentence templates, so a router
has something to specialise on; the tasks (classification, copy / reverse / sort, toy
translation, arithmetic) come with several natural-language instruction phrasings.
"""

from __future__ import annotations

import random
import zlib

DOMAINS: dict[str, dict[str, list[str]]] = {
    "weather": {
        "noun": ["rain", "snow", "wind", "cloud", "storm", "fog", "sun", "frost", "hail", "breeze"],
        "adj": ["cold", "warm", "grey", "heavy", "light", "bright", "wet", "dry", "calm", "wild"],
        "verb": ["falls", "blows", "drifts", "clears", "gathers", "passes", "returns", "fades"],
        "place": ["the valley", "the coast", "the hills", "the north", "the city", "the plain"],
    },
    "cooking": {
        "noun": ["soup", "bread", "rice", "sauce", "onion", "garlic", "butter", "pepper", "cheese", "flour"],
        "adj": ["hot", "sweet", "salty", "fresh", "crisp", "soft", "spicy", "golden", "thick", "rich"],
        "verb": ["simmers", "bakes", "melts", "roasts", "boils", "rests", "browns", "thickens"],
        "place": ["the pan", "the oven", "the pot", "the bowl", "the kitchen", "the table"],
    },
    "animals": {
        "noun": ["fox", "owl", "horse", "cat", "wolf", "deer", "bear", "crow", "goat", "otter"],
        "adj": ["quick", "quiet", "old", "young", "shy", "clever", "lazy", "brave", "tiny", "proud"],
        "verb": ["runs", "sleeps", "hunts", "hides", "jumps", "watches", "swims", "climbs"],
        "place": ["the forest", "the river", "the barn", "the meadow", "the cave", "the field"],
    },
    "trade": {
        "noun": ["price", "market", "coin", "loan", "stock", "tax", "profit", "ledger", "trader", "bank"],
        "adj": ["high", "low", "stable", "rising", "falling", "fair", "steep", "modest", "large", "small"],
        "verb": ["grows", "drops", "doubles", "recovers", "settles", "shrinks", "climbs", "holds"],
        "place": ["the exchange", "the port", "the capital", "the bazaar", "the office", "the harbour"],
    },
}

_TEMPLATES = [
    "the {adj} {noun} {verb} in {place} .",
    "in {place} the {noun} {verb} and the {noun2} {verb2} .",
    "a {adj} {noun} {verb} near {place} while the {adj2} {noun2} {verb2} .",
    "every day the {noun} {verb} , then the {adj} {noun2} {verb2} .",
    "nobody expected the {noun} to be so {adj} in {place} .",
]

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]

# Toy translation: English content words -> a made-up language "Lumi" (a fixed, seeded lexicon),
# adjectives follow their nouns in Lumi.
_SYLL = ["ka", "lo", "mi", "te", "ru", "sa", "no", "vi", "pe", "zu", "ha", "ri", "do", "ne", "xi", "bo"]


def _rng(*parts) -> random.Random:
    return random.Random(zlib.crc32("/".join(str(p) for p in parts).encode()))


def _lexicon() -> dict[str, str]:
    words = sorted({w for d in DOMAINS.values() for k in ("noun", "adj", "verb") for w in d[k]}
                   | {"the", "a", "and", "in", "near", "while"})
    r = _rng("lumi-lexicon")
    out, used = {}, set()
    for w in words:
        while True:
            cand = "".join(r.choice(_SYLL) for _ in range(r.randint(2, 3)))
            if cand not in used:
                used.add(cand)
                out[w] = cand
                break
    return out


LUMI = _lexicon()


def _split_seed(split: str) -> int:
    return {"train": 0, "validation": 1, "test": 2}.get(split, zlib.crc32(split.encode()))


def sentence(r: random.Random, domain: str) -> str:
    d = DOMAINS[domain]
    fill = {k: r.choice(d[k]) for k in ("noun", "adj", "verb", "place")}
    fill.update(noun2=r.choice(d["noun"]), verb2=r.choice(d["verb"]), adj2=r.choice(d["adj"]))
    return r.choice(_TEMPLATES).format(**fill)


def documents(split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` documents ``{'text', 'domain'}``: 2-5 sentences from one domain each."""
    r = _rng("docs", split, _split_seed(split), seed)
    names = sorted(DOMAINS)
    out = []
    for _ in range(n):
        dom = r.choice(names)
        out.append({"text": " ".join(sentence(r, dom) for _ in range(r.randint(2, 5))), "domain": dom})
    return out


def simple_phrase(r: random.Random) -> tuple[str, str]:
    """An English ``'the adj noun verb'`` phrase and its Lumi translation (``noun adj verb``)."""
    d = DOMAINS[r.choice(sorted(DOMAINS))]
    adj, noun, verb = r.choice(d["adj"]), r.choice(d["noun"]), r.choice(d["verb"])
    en = f"the {adj} {noun} {verb}"
    lumi = f"{LUMI['the']} {LUMI[noun]} {LUMI[adj]} {LUMI[verb]}"
    return en, lumi


def task_examples(task: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` ``{'inputs', 'targets'}`` pairs (raw, no instruction) for one algorithmic task.

    Tasks: ``classify`` (domain of a sentence), ``copy``, ``reverse``, ``sort`` (word lists),
    ``translate`` (English -> Lumi), ``add`` (number words).
    """
    r = _rng("task", task, split, _split_seed(split), seed)
    words = sorted({w for d in DOMAINS.values() for w in d["noun"]})
    out = []
    for _ in range(n):
        if task == "classify":
            dom = r.choice(sorted(DOMAINS))
            out.append({"inputs": sentence(r, dom), "targets": dom})
        elif task in ("copy", "reverse", "sort"):
            seq = [r.choice(words) for _ in range(r.randint(3, 6))]
            tgt = {"copy": seq, "reverse": seq[::-1], "sort": sorted(seq)}[task]
            out.append({"inputs": " ".join(seq), "targets": " ".join(tgt)})
        elif task == "translate":
            en, lumi = simple_phrase(r)
            out.append({"inputs": en, "targets": lumi})
        elif task == "add":
            a, b = r.randint(0, 9), r.randint(0, 9)
            out.append({"inputs": f"{NUMBERS[a]} plus {NUMBERS[b]}", "targets": NUMBERS[a + b]})
        else:
            raise ValueError(f"unknown synthetic task {task!r}; valid: {', '.join(TASKS)}")
    return out


TASKS = ("classify", "copy", "reverse", "sort", "translate", "add")

# Instruction phrasings (FLAN style). The last phrasing of each task is held out for evaluation.
TEMPLATES: dict[str, list[str]] = {
    "classify": ["What is this text about? {inputs}", "Topic of the sentence: {inputs}",
                 "Classify the domain. Text: {inputs}", "Which subject does this belong to? {inputs}"],
    "copy": ["Repeat these words: {inputs}", "Copy the list: {inputs}", "Say again: {inputs}",
             "Echo the following words exactly: {inputs}"],
    "reverse": ["Reverse the order of these words: {inputs}", "Write the list backwards: {inputs}",
                "Backwards please: {inputs}", "Give these words from last to first: {inputs}"],
    "sort": ["Sort these words alphabetically: {inputs}", "Put in alphabetical order: {inputs}",
             "Alphabetize: {inputs}", "Arrange the words from a to z: {inputs}"],
    "translate": ["Translate to Lumi: {inputs}", "English: {inputs} Lumi:", "How do you say this in Lumi? {inputs}",
                  "Render the phrase in the Lumi language: {inputs}"],
    "add": ["What is {inputs}?", "Compute {inputs}.", "Add: {inputs}", "Tell me the sum of {inputs}."],
}


def instruction(task: str, inputs: str, r: random.Random, held_out: bool) -> str:
    """Wrap ``inputs`` in one of ``task``'s phrasings (the held-out one iff ``held_out``)."""
    phr = TEMPLATES[task]
    return (phr[-1] if held_out else r.choice(phr[:-1])).format(inputs=inputs)


def corpus_text(n_docs: int = 4000, seed: int = 0) -> list[str]:
    """Lines used to train the SentencePiece vocabulary: documents plus every task's text."""
    lines = [d["text"] for d in documents("train", n_docs, seed)]
    for t in TASKS:
        r = _rng("vocab", t, seed)
        for ex in task_examples(t, "train", 300, seed):
            lines.append(instruction(t, ex["inputs"], r, False) + " " + ex["targets"])
            lines.append(TEMPLATES[t][-1].format(inputs=ex["inputs"]))
    return lines
