"""Captions, statements and questions about a scene, built from *claims*.

A claim is a small fact about a scene, checkable by :func:`holds`:

- ``("obj", colour, shape, size | None)``: such an object is in the scene;
- ``("rel", (colour, shape), relation, (colour, shape))``: the first object is *relation* the second;
- ``("count", n)``: the scene holds ``n`` objects.

Text is rendered from claims with templates, so every caption's truth is known exactly: true
captions are rendered from :func:`true_claims`, hard negatives from :func:`false_claim`, which is
verified false. The ``paraphrase`` shift renders the same claims with a disjoint set of templates and
a few synonyms; ``keyword_soup`` imitates noisy web alt-text.
"""

from __future__ import annotations

import numpy as np

from vlat.world.scenes import COLOURS, SHAPES, SIZES, Obj, Scene, relation

RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = ("zero", "one", "two", "three")
SOUP_WORDS = ("photo", "image", "stock", "free", "download", "hd", "picture", "wallpaper", "best")
# Paraphrase synonyms (words that never appear in ID captions).
PARA_SIZE = {"small": "little", "large": "big"}
PARA_REL = {"left of": "to the left of", "right of": "to the right of", "above": "over", "below": "under"}
# Answers of the question-answering task (the VQA analogue's answer vocabulary).
ANSWERS = ("yes", "no") + COLOURS + SHAPES + SIZES + NUMBER_WORDS[1:]


def holds(scene: Scene, claim: tuple) -> bool:
    """Whether ``claim`` is true of ``scene``."""
    kind = claim[0]
    if kind == "obj":
        _, colour, shape, size = claim
        return any(o.colour == colour and o.shape == shape and size in (None, o.size) for o in scene)
    if kind == "rel":
        _, (c1, s1), rel, (c2, s2) = claim
        a = [o for o in scene if (o.colour, o.shape) == (c1, s1)]
        b = [o for o in scene if (o.colour, o.shape) == (c2, s2)]
        return any(relation(x, y) == rel for x in a for y in b if x is not y)
    if kind == "count":
        return len(scene) == claim[1]
    raise ValueError(f"unknown claim kind {kind!r}")


def true_claims(scene: Scene) -> list[tuple]:
    """Every claim the caption templates make about a scene, in a fixed order."""
    claims: list[tuple] = [("obj", o.colour, o.shape, o.size) for o in scene]
    claims.append(("obj", scene[0].colour, scene[0].shape, None))
    for i, o in enumerate(scene):
        for p in scene[i + 1:]:
            claims.append(("rel", (o.colour, o.shape), relation(o, p), (p.colour, p.shape)))
            claims.append(("rel", (p.colour, p.shape), relation(p, o), (o.colour, o.shape)))
    claims.append(("count", len(scene)))
    return claims


def false_claim(scene: Scene, rng: np.random.Generator) -> tuple:
    """A minimally wrong claim (a hard negative): one attribute, the relation or the count changed."""
    for _ in range(50):
        kind = int(rng.integers(4))
        o = scene[int(rng.integers(len(scene)))]
        if kind == 0:  # an object that is not there: one attribute of a real one changed
            field = int(rng.integers(3))
            colour = COLOURS[int(rng.integers(len(COLOURS)))] if field == 0 else o.colour
            shape = SHAPES[int(rng.integers(len(SHAPES)))] if field == 1 else o.shape
            size = SIZES[int(rng.integers(len(SIZES)))] if field == 2 else o.size
            claim = ("obj", colour, shape, size)
        elif kind == 1 and len(scene) >= 2:  # right objects, wrong relation
            p = scene[(scene.index(o) + 1) % len(scene)]
            claim = ("rel", (o.colour, o.shape), RELATIONS[int(rng.integers(4))], (p.colour, p.shape))
        elif kind == 2 and len(scene) >= 2:  # right relation, one object swapped for an absent one
            p = scene[(scene.index(o) + 1) % len(scene)]
            colour = COLOURS[int(rng.integers(len(COLOURS)))]
            claim = ("rel", (colour, o.shape), relation(o, p), (p.colour, p.shape))
        else:
            claim = ("count", int(rng.integers(1, 4)))
        if not holds(scene, claim):
            return claim
    raise RuntimeError("could not draw a false claim")  # pragma: no cover - 50 tries never all fail


def caption_text(claim: tuple, paraphrase: bool = False, variant: int = 0) -> str:
    """Render a claim as a caption (ID templates, or the held-out paraphrase templates)."""
    kind = claim[0]
    if kind == "obj":
        _, c, s, size = claim
        if paraphrase:
            return f"the {s} that is {c}" if size is None else f"one {PARA_SIZE[size]} {c} {s} is shown"
        return f"there is a {c} {s}" if size is None else f"a {size} {c} {s}"
    if kind == "rel":
        _, (c1, s1), rel, (c2, s2) = claim
        if paraphrase:
            return f"the {c1} {s1} is {PARA_REL[rel]} the {c2} {s2}"
        return f"a {c1} {s1} {rel} a {c2} {s2}"
    n = NUMBER_WORDS[claim[1]]
    return f"an image with {n} things" if paraphrase else f"{n} objects"


def statement_text(claim: tuple) -> str:
    """Render a claim as a statement to judge true or false (the NLVR2 analogue)."""
    kind = claim[0]
    if kind == "obj":
        _, c, s, size = claim
        return f"there is a {c} {s}" if size is None else f"there is a {size} {c} {s}"
    if kind == "rel":
        _, (c1, s1), rel, (c2, s2) = claim
        return f"the {c1} {s1} is {rel} the {c2} {s2}"
    return f"there are {NUMBER_WORDS[claim[1]]} objects"


def captions(scene: Scene, paraphrase: bool = False) -> list[str]:
    """All true captions of a scene (3 to 12 of them): the multi-positive set."""
    return [caption_text(c, paraphrase) for c in true_claims(scene)]


def keyword_soup(rng: np.random.Generator) -> str:
    """Noisy alt-text: a colour, a shape and three stock-photo words in random order."""
    words = [COLOURS[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))]]
    words += [SOUP_WORDS[i] for i in rng.choice(len(SOUP_WORDS), size=3, replace=False)]
    rng.shuffle(words)
    return " ".join(words)


def question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """Return ``(question, answer)``; only questions with one unambiguous answer are asked."""
    kind = int(rng.integers(5))
    o = scene[int(rng.integers(len(scene)))]
    unique_shape = sum(p.shape == o.shape for p in scene) == 1
    unique_colour = sum(p.colour == o.colour for p in scene) == 1
    if kind == 0 and unique_shape:
        return f"what color is the {o.shape} ?", o.colour
    if kind == 1 and unique_colour:
        return f"what shape is the {o.colour} object ?", o.shape
    if kind == 2:
        return f"what size is the {o.colour} {o.shape} ?", o.size
    if kind == 3:
        return "how many objects are there ?", NUMBER_WORDS[len(scene)]
    if rng.random() < 0.5:
        c, s = o.colour, o.shape
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if not holds(scene, ("obj", c, s, None))]
        c, s = absent[int(rng.integers(len(absent)))]
    return f"is there a {c} {s} ?", "yes" if holds(scene, ("obj", c, s, None)) else "no"


def class_prompt(colour: str, shape: str, paraphrase: bool = False) -> str:
    """The zero-shot classification prompt for a colour-shape class."""
    return f"the {shape} that is {colour}" if paraphrase else f"a photo of a {colour} {shape}"


def all_words() -> list[str]:
    """Every word a template can produce (the tokenizer's vocabulary is built from this)."""
    fixed = """a an the there is are that one shown image with things objects of to photo what color shape
    size how many object left right above below over under ?""".split()
    words = set(fixed) | set(COLOURS) | set(SHAPES) | set(SIZES) | set(NUMBER_WORDS) | set(SOUP_WORDS)
    words |= set(PARA_SIZE.values()) | set(ANSWERS) | {"yes", "no"}
    return sorted(words)


__all__ = ["ANSWERS", "Obj", "caption_text", "captions", "class_prompt", "false_claim", "holds",
           "keyword_soup", "question", "statement_text", "true_claims"]
