from collections import Counter

import pytest

from tempflow.errors import ConfigError, TempflowError
from tempflow.prompts import load_prompts, prompt_strata
from tempflow.training.loop import PromptSampler, minibatches_per_step
from tempflow.worlds.shapes.grammar import parse_prompt


def test_one_stratum_draws_every_prompt_once_per_pass():
    prompts = [f"p{i}" for i in range(7)]
    s = PromptSampler(prompts, seed=3)
    first, second = s.next(7), s.next(7)
    assert sorted(first) == sorted(prompts) == sorted(second)
    assert first != second  # each pass has its own order


def test_category_balance_draws_each_category_equally_often():
    prompts = load_prompts("shapes-train")
    strata = prompt_strata(prompts, "category")
    cats = Counter(parse_prompt(p).category for p in prompts)
    assert max(cats.values()) > 20 * min(cats.values())  # the shipped set is far from balanced
    s = PromptSampler(prompts, seed=0, strata=strata)
    drawn = s.next(len(strata) * 50)
    got = Counter(parse_prompt(p).category for p in drawn)
    assert set(got) == set(cats) and set(got.values()) == {50}
    # each round of len(strata) draws holds one prompt of each category
    first_round = {parse_prompt(p).category for p in drawn[: len(strata)]}
    assert len(first_round) == len(strata)
    # the small strata go through all their prompts before repeating one
    colors = [p for p in drawn if parse_prompt(p).category == "colors"]
    assert len(set(colors[: cats["colors"]])) == cats["colors"]


def test_sampler_state_resumes_the_same_sequence():
    prompts = load_prompts("shapes-train")
    strata = prompt_strata(prompts, "category")
    a = PromptSampler(prompts, seed=1, strata=strata)
    a.next(37)
    b = PromptSampler(prompts, seed=1, strata=strata)
    b.load_state(a.state())
    assert a.next(60) == b.next(60)


def test_balance_needs_grammar_prompts_and_matching_checkpoints():
    with pytest.raises(ConfigError, match="prompt_balance=none"):
        prompt_strata(["a circle", "a photo of a cat"], "category")
    assert prompt_strata(["a photo of a cat"], "none") is None
    prompts = ["a circle", "two squares"]
    one = PromptSampler(prompts, seed=0)
    two = PromptSampler(prompts, seed=0, strata=prompt_strata(prompts, "category"))
    with pytest.raises(TempflowError, match="prompt_balance"):
        two.load_state(one.state())
    with pytest.raises(TempflowError, match="start a new run"):
        one.load_state({"epoch": 0, "index": 1})


@pytest.mark.parametrize("n,accum,per_rollout,plan", [
    (6, 1, 0, [1] * 6), (7, 3, 0, [3, 3, 1]), (6, 1, 1, [6]), (7, 1, 2, [4, 3]), (2, 1, 5, [1, 1]),
])
def test_minibatches_per_step(n, accum, per_rollout, plan):
    assert minibatches_per_step(n, accum, per_rollout) == plan
