import pytest

from tempflow.errors import PromptError
from tempflow.worlds.shapes.grammar import CATEGORIES, Phrase, Spec, parse_prompt
from tempflow.worlds.shapes.prompts import enumerate_specs


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_prompt_round_trips(category):
    specs = enumerate_specs(category)
    assert len(specs) >= 3
    for spec in specs:
        parsed = parse_prompt(spec.text())
        assert parsed == spec
        assert parsed.category == category
        assert parsed.text() == spec.text()


@pytest.mark.parametrize(
    "prompt,category,spec",
    [
        ("a circle", "single_object", Spec((Phrase("circle"),))),
        ("a red circle", "colors", Spec((Phrase("circle", "red"),))),
        ("three green triangles", "counting", Spec((Phrase("triangle", "green", 3, True),))),
        ("one square", "counting", Spec((Phrase("square", None, 1, True),))),
        ("a circle and a blue square", "two_object", Spec((Phrase("circle"), Phrase("square", "blue")))),
        ("a red square and a green circle", "color_attr",
         Spec((Phrase("square", "red"), Phrase("circle", "green")))),
        ("a red circle to the left of a blue square", "position",
         Spec((Phrase("circle", "red"), Phrase("square", "blue")), "left_of")),
        ("A Yellow Triangle BELOW a circle.", "position",
         Spec((Phrase("triangle", "yellow"), Phrase("circle")), "below")),
    ],
)
def test_examples(prompt, category, spec):
    assert parse_prompt(prompt) == spec
    assert spec.category == category


@pytest.mark.parametrize(
    "prompt,hint",
    [
        ("", "empty"),
        ("a dog", "not a shape"),
        ("a red", "expected a shape after 'a red'"),
        ("a big red circle", "'big' after 'a' is neither a colour nor a shape"),
        ("a red circle left of a square", "does not know 'left of a square' after 'a red circle'; join two phrases"),
        ("five circles", "number word"),
        ("two circle", "plural"),
        ("a circles", "singular"),
        ("four circles and a square", "at most"),
        ("two circles above a square", "relation"),
        ("a circle and a circle", "different colours"),
        ("a red circle and a circle", "different colours"),
        ("a circle near a square", "'near a square' after 'a circle'.*to the left of, to the right of"),
        ("and a circle", "empty phrase"),
    ],
)
def test_outside_the_grammar_is_a_clear_error(prompt, hint):
    with pytest.raises(PromptError, match=hint):
        parse_prompt(prompt)
