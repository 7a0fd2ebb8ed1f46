"""The prompt grammar of the shapes world, its parser and its categories.

    prompt   := phrase | phrase " and " phrase | phrase " " relation " " phrase
    phrase   := ("a" | "an") [colour] shape          -- one object
              | number [colour] shape "s"            -- number in two, three, four
              | "one" [colour] shape                 -- an explicit count of one
    relation := "to the left of" | "to the right of" | "above" | "below"

Rules: at most MAX_OBJECTS objects in all; the two phrases of a relation are single objects; two
phrases that name the same shape must both name a colour, and different ones.

The category of a prompt is the hardest skill it tests, as in GenEval:
position (a relation) > counting (a number word) > color_attr (two phrases with two different
colours) > two_object (two phrases) > colors (one coloured phrase) > single_object.
"""

from __future__ import annotations

from dataclasses import dataclass

from tempflow.errors import PromptError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "cyan")
RELATIONS: dict[str, str] = {
    "to the left of": "left_of",
    "to the right of": "right_of",
    "above": "above",
    "below": "below",
}
RELATION_TEXT: dict[str, str] = {v: k for k, v in RELATIONS.items()}
NUMBERS: dict[str, int] = {"one": 1, "two": 2, "three": 3, "four": 4}
NUMBER_TEXT: dict[int, str] = {v: k for k, v in NUMBERS.items()}
CATEGORIES: tuple[str, ...] = (
    "single_object", "two_object", "counting", "colors", "position", "color_attr",
)
MAX_OBJECTS = 4


@dataclass(frozen=True)
class Phrase:
    """`count` objects of one shape, of one colour (None: any colour)."""

    shape: str
    colour: str | None = None
    count: int = 1
    explicit_count: bool = False  # written as a number word ("one", "two", ...)

    def text(self) -> str:
        words = [self.colour] if self.colour else []
        if self.explicit_count or self.count > 1:
            noun = self.shape + ("s" if self.count > 1 else "")
            return " ".join([NUMBER_TEXT[self.count], *words, noun])
        return " ".join(["a", *words, self.shape])


@dataclass(frozen=True)
class Spec:
    """A parsed prompt: one or two phrases and, for two single objects, an optional relation."""

    phrases: tuple[Phrase, ...]
    relation: str | None = None  # left_of | right_of | above | below: phrases[0] REL phrases[1]

    def text(self) -> str:
        if len(self.phrases) == 1:
            return self.phrases[0].text()
        joint = RELATION_TEXT[self.relation] if self.relation else "and"
        return f"{self.phrases[0].text()} {joint} {self.phrases[1].text()}"

    @property
    def num_objects(self) -> int:
        return sum(p.count for p in self.phrases)

    @property
    def category(self) -> str:
        if self.relation:
            return "position"
        if any(p.explicit_count or p.count > 1 for p in self.phrases):
            return "counting"
        if len(self.phrases) == 2:
            colours = [p.colour for p in self.phrases]
            if None not in colours and colours[0] != colours[1]:
                return "color_attr"
            return "two_object"
        return "colors" if self.phrases[0].colour else "single_object"


def _parse_phrase(words: list[str], prompt: str) -> Phrase:
    if not words:
        raise PromptError(f"prompt {prompt!r} has an empty phrase; write e.g. 'a red circle'")
    head, rest = words[0], words[1:]
    if head in ("a", "an"):
        count, explicit = 1, False
    elif head in NUMBERS:
        count, explicit = NUMBERS[head], True
    else:
        raise PromptError(
            f"prompt {prompt!r}: a phrase starts with 'a' or a number word "
            f"({', '.join(NUMBERS)}), not {head!r}"
        )
    colour = None
    if rest and rest[0] in COLOURS:
        colour, rest = rest[0], rest[1:]
    said = " ".join(words[: len(words) - len(rest)])
    if not rest:
        raise PromptError(f"prompt {prompt!r}: expected a shape after {said!r}; shapes are {', '.join(SHAPES)}")
    if len(rest) > 1:
        if rest[0].rstrip("s") in SHAPES:
            raise PromptError(
                f"prompt {prompt!r}: the grammar does not know {' '.join(rest[1:])!r} after "
                f"{said + ' ' + rest[0]!r}; join two phrases with 'and' or a relation ({', '.join(RELATIONS)})"
            )
        raise PromptError(
            f"prompt {prompt!r}: {rest[0]!r} after {said!r} is neither a colour nor a shape; "
            f"colours are {', '.join(COLOURS)}; shapes are {', '.join(SHAPES)}"
        )
    noun = rest[0]
    shape = noun[:-1] if count > 1 and noun.endswith("s") else noun
    if shape not in SHAPES or (count > 1) != (noun != shape):
        form = "plural (e.g. 'circles')" if count > 1 else "singular (e.g. 'circle')"
        raise PromptError(
            f"prompt {prompt!r}: {noun!r} is not a shape in the {form}; shapes are {', '.join(SHAPES)}"
        )
    return Phrase(shape, colour, count, explicit)


def _split(words: list[str]) -> tuple[list[str], str | None, list[str]]:
    """Split the words at 'and' or at a relation; returns (left, joint, right)."""
    for rel_text, rel in RELATIONS.items():
        rw = rel_text.split()
        for i in range(1, len(words) - len(rw) + 1):
            if words[i : i + len(rw)] == rw:
                return words[:i], rel, words[i + len(rw) :]
    if "and" in words:
        i = words.index("and")
        return words[:i], "and", words[i + 1 :]
    return words, None, []


def _check(spec: Spec, prompt: str) -> Spec:
    if spec.num_objects > MAX_OBJECTS:
        raise PromptError(f"prompt {prompt!r} asks for {spec.num_objects} objects; at most {MAX_OBJECTS}")
    if spec.relation and any(p.count != 1 for p in spec.phrases):
        raise PromptError(f"prompt {prompt!r}: a relation takes two single objects ('a ... above a ...')")
    if len(spec.phrases) == 2:
        a, b = spec.phrases
        if a.shape == b.shape and (a.colour is None or b.colour is None or a.colour == b.colour):
            raise PromptError(
                f"prompt {prompt!r}: two phrases with the same shape must name two different colours"
            )
    return spec


def parse_prompt(prompt: str) -> Spec:
    """Parse a prompt of the grammar into a Spec; raise PromptError saying what is wrong."""
    words = prompt.strip().lower().rstrip(".").replace(",", " ").split()
    if not words:
        raise PromptError("empty prompt; write e.g. 'a red circle'")
    left, joint, right = _split(words)
    if joint is None:
        return _check(Spec((_parse_phrase(left, prompt),)), prompt)
    phrases = (_parse_phrase(left, prompt), _parse_phrase(right, prompt))
    return _check(Spec(phrases, None if joint == "and" else joint), prompt)
