"""The ``ifeval_constraints`` prompt source (Tülu 3's RLVR recipe): seeded and deterministic, never the
benchmark, and every constraint type scored by its own checker with the arguments it was built with."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from rlhf_pipeline import constraints
from rlhf_pipeline.data import load_ifeval
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.rewards.ifeval import check_instructions, instruction_registry

BASES = [("alpaca_eval", "Explain how a bicycle gear works."),
         ("arena_hard", "Write a haiku about autumn leaves in a city park."),
         ("file", "List three uses of baking soda around the house.")]
ALL = constraints.instruction_ids()


def build(bases=BASES, seed=0, count=(1, 3), allowed=ALL, benchmark=frozenset()):
    return constraints.build_constraint_prompts(list(bases), seed, count, list(allowed), set(benchmark))


def test_same_seed_same_prompts_and_order_does_not_matter():
    a, b = build(), build()
    assert (a.prompts, a.extra) == (b.prompts, b.extra)
    backwards = build(list(reversed(BASES)))
    assert backwards.prompts == list(reversed(a.prompts))  # a base's constraints depend on it alone
    other = build(seed=1)
    assert other.prompts != a.prompts


def test_prompt_is_the_base_then_the_checkers_own_descriptions():
    source = build(count=(3, 3))
    registry = instruction_registry()
    for prompt, base, ids, kwargs in zip(source.prompts, source.extra["base_instruction"],
                                         source.extra["instruction_id_list"], source.extra["kwargs"]):
        assert prompt.startswith(base + "\n\n")
        assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids)
        # the stored arguments rebuild exactly the descriptions the prompt carries
        rebuilt = " ".join(registry[i](i).build_description(**kw).strip() for i, kw in zip(ids, json.loads(kwargs)))
        assert prompt == f"{base}\n\n{rebuilt}"


def test_no_two_conflicting_constraints_in_one_prompt():
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS

    bases = [("file", f"Describe the colour number {i} of a rainbow.") for i in range(200)]
    source = build(bases, count=(3, 3))
    for ids in source.extra["instruction_id_list"]:
        for i, a in enumerate(ids):
            for b in ids[i + 1:]:
                assert b not in INSTRUCTION_CONFLICTS.get(a, ()) and a not in INSTRUCTION_CONFLICTS.get(b, ())


def test_constraint_count_and_allowed_ids_are_respected():
    source = build(count=(2, 2), allowed=["punctuation:no_comma", "detectable_format:title"])
    assert all(sorted(ids) == ["detectable_format:title", "punctuation:no_comma"]
               for ids in source.extra["instruction_id_list"])
    with pytest.raises(PipelineError, match=r"data.constraints.instructions: unknown IFEval instruction ids \['no:such'\]"):
        build(allowed=["no:such"])


def test_benchmark_prompts_and_their_base_instructions_are_excluded():
    bench_prompt = load_ifeval().prompts[0]
    benchmark = constraints.benchmark_shingles()
    words = bench_prompt.split()
    quoted = "Please help: " + " ".join(words[2:2 + constraints.SHINGLE_WORDS + 1]) + " thanks"
    bases = [("file", bench_prompt), ("file", quoted), *BASES]
    source = build(bases, benchmark=benchmark)
    assert source.facts["excluded_benchmark_overlap"] == 2
    assert source.extra["base_instruction"] == [t for _, t in BASES]
    with pytest.raises(PipelineError, match="every base instruction overlaps the IFEval benchmark"):
        build([("file", bench_prompt)], benchmark=benchmark)


def test_the_packaged_source_never_holds_a_benchmark_prompt():
    """The real source (2 110 packaged instructions): no prompt, and no base instruction, shares an
    8-word run with any of IFEval's 541 prompts."""
    from rlhf_pipeline.data import load_source
    from rlhf_pipeline.params import DataParams

    source = load_source(DataParams(source="ifeval_constraints"), seed=42)
    benchmark = constraints.benchmark_shingles()
    assert len(source.prompts) > 2000
    assert not any(constraints.overlaps_benchmark(p, benchmark) for p in source.extra["base_instruction"])
    bench_texts = set(load_ifeval().prompts)
    assert bench_texts.isdisjoint(source.prompts)
    used = {i for ids in source.extra["instruction_id_list"] for i in ids}
    assert used == set(ALL)  # every constraint type appears (each is tested below)


# One hand-made (kwargs, followed response, not-followed response) per constraint type the source draws.
HAND_MADE = {
    "change_case:capital_word_frequency": ({"capital_frequency": 2, "capital_relation": "at least"},
                                           "THIS IS fine", "this is fine"),
    "change_case:english_capital": ({}, "ALL OF THIS IS UPPER CASE ENGLISH TEXT.", "Not all upper case."),
    "change_case:english_lowercase": ({}, "all of this is lower case english text.", "Some Upper Case here."),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Name a fruit."}, "Name a fruit. An apple.",
                                  "An apple."),
    "combination:two_responses": ({}, "First answer.\n******\nSecond answer.", "Only one answer."),
    "detectable_content:number_placeholders": ({"num_placeholders": 2}, "Send it to [name] at [address].",
                                               "Send it to Bob at home."),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, "Hello.\n\nP.S. See you soon.", "Hello."),
    "detectable_format:constrained_response": ({}, "My answer is yes.", "Perhaps."),
    "detectable_format:json_format": ({}, '{"answer": 42}', "answer: 42"),
    "detectable_format:multiple_sections": ({"section_spliter": "Section", "num_sections": 2},
                                            "Section 1\nIntro.\nSection 2\nBody.", "Just one block."),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "* one\n* two", "* one"),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 1}, "This is *important* text.",
                                                      "Nothing highlighted."),
    "detectable_format:title": ({}, "<<A Title>>\nText.", "No title here."),
    "keywords:existence": ({"keywords": ["river"]}, "The river runs.", "The stream runs."),
    "keywords:forbidden_words": ({"forbidden_words": ["cat"]}, "A dog barks.", "A cat meows."),
    "keywords:frequency": ({"keyword": "tea", "frequency": 2, "relation": "at least"}, "tea and more tea.",
                           "tea only once."),
    "keywords:letter_frequency": ({"letter": "z", "let_frequency": 2, "let_relation": "at least"},
                                  "Zebras zoom.", "Horses run."),
    "language:response_language": ({"language": "en"},
                                   "This answer is written entirely in the English language, as asked.",
                                   "Esta respuesta está escrita completamente en español, como se pidió."),
    "length_constraints:nth_paragraph_first_word": ({"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
                                                    "First part.\n\nThen the second.", "First part.\n\nNext one."),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2}, "One.\n***\nTwo.",
                                            "Just one paragraph, no divider."),
    "length_constraints:number_sentences": ({"num_sentences": 2, "relation": "less than"}, "Just one sentence.",
                                            "One. Two. Three."),
    "length_constraints:number_words": ({"num_words": 5, "relation": "at least"}, "one two three four five six",
                                        "one two"),
    "punctuation:no_comma": ({}, "No commas here.", "Well, a comma."),
    "startend:end_checker": ({"end_phrase": "Any other questions?"}, "Done. Any other questions?",
                             "Any other questions? Done."),
    "startend:quotation": ({}, '"Wrapped in quotes."', "Not wrapped."),
}


def test_every_constraint_type_has_a_hand_made_check():
    assert sorted(HAND_MADE) == ALL


@pytest.mark.parametrize("iid", sorted(HAND_MADE))
def test_scorer_on_hand_made_responses(iid):
    kwargs, good, bad = HAND_MADE[iid]
    prompt = "Name a fruit." if iid == "combination:repeat_prompt" else "Write something."
    strict_good, loose_good = check_instructions(good, prompt, [iid], [kwargs])
    strict_bad, loose_bad = check_instructions(bad, prompt, [iid], [kwargs])
    assert strict_good == [True] and loose_good == [True]
    assert strict_bad == [False] and loose_bad == [False]


def test_generated_prompts_are_scored_by_the_ifeval_scorer():
    from rlhf_pipeline.rewards.ifeval import score, validate

    source = build(count=(1, 1), allowed=["punctuation:no_comma"])
    table = pa.table({"prompt_id": [str(i) for i in range(len(source.prompts))], "prompt": source.prompts,
                      "instruction_id_list": pa.array(source.extra["instruction_id_list"], pa.list_(pa.string())),
                      "kwargs": source.extra["kwargs"]})
    validate(table, "constraint prompts")
    prompts = {r["prompt_id"]: r for r in table.to_pylist()}
    out = score(prompts, [("0", "No commas at all."), ("1", "Yes, a comma.")])
    assert out["reward_ifeval"].to_pylist() == [1.0, 0.0]
