"""Noun-phrase cleaning: one phrase, the caller's known labels, a backend's whole proposal, and the
wiring through ConceptsCore (every backend's output is cleaned and capped)."""

from __future__ import annotations

import json
import re
from importlib import resources

import inflect
import numpy as np
import pytest

from services.common.concepts import HardNegative, Instance, NounPhrase, Proposal
from services.common.errors import InvalidInput
from services.common.masks import encode_rle
from services.common.settings import Settings
from services.concepts.core import ConceptsCore
from services.concepts.phrases import KEEP_AS_IS, PREPOSITIONS, clean_labels, clean_phrase, clean_proposal
from tests.common.image_cases import png

# raw text -> clean phrase
CLEAN_CASES = {
    "Red Car": "red car",                                # lower-case
    "dog\x00cat": "dog cat",                             # a model's control characters never survive
    "\x1b[31mred\x1b[0m car": "31mred [0m car",        # ESC gone: what is left is plain text
    "hot\tdog\n": "hot dog",
    "dogs": "dog",                                       # plural head noun
    "yellow taxis": "yellow taxi",                       # plural ending in "is"
    "skis": "ski",
    "people": "person",                                  # irregular plurals
    "children": "child",
    "mice": "mouse",
    "knives": "knife",
    "cacti": "cactus",                                   # a plural inflect does not know
    "menus": "menu",                                     # a noun in "u": its plural ends in "us"
    "hoodies": "hoodie",                                 # a noun in "ie", not "hoody"
    "sheep": "sheep",                                    # same in both numbers
    "bus": "bus",                                        # singulars ending in "s": inflect says "bu"
    "buses": "bus",
    "grass": "grass",
    "cactus": "cactus",
    "tennis": "tennis",
    "rhinoceros": "rhinoceros",
    "scissors": "scissors",                              # plural-only nouns stay plural
    "glasses": "glasses",
    "jeans": "jeans",
    "wine glasses": "wine glass",                        # ... unless it is glassware
    "cups of coffee": "cup of coffee",                   # the head comes before a preposition
    "people on bikes": "person on bikes",
    "dog's bowl": "dog bowl",                            # possessives
    "the children's toys": "child toy",
    "the dogs' bowls": "dog bowl",
    "the bus's wheels": "bus wheel",
    "dog \u2019s bowl": "dog bowl",                      # a tokenizer's split possessive, typographic apostrophe
    "a   red\t\ncar": "red car",                         # whitespace collapsed
    "the cat": "cat",                                    # leading articles
    "an apple": "apple",
    "A few apples": "apple",                             # determiners and numbers
    "two dogs": "dog",
    "2 dogs": "dog",                                     # digits count too
    "a couple of dogs": "dog",                           # amounts
    "lots of people": "person",
    "dozens of eggs": "egg",
    "number 10 bus": "number 10 bus",                    # ... but a number inside names the object
    "glasses of water": "glass of water",                # glassware: a drink follows
    "James's car": "james car",                          # a singular possessor ending in "s"
    "men's shoes": "man shoe",                           # an irregular plural possessor
    "gray cats": "grey cat",                             # one spelling per concept
    "thermos": "thermos",                                # singulars inflect would cut
    "gps": "gps",
    "dogs and cats": "dog and cat",                      # both sides of a coordination
    "knives or forks": "knife or fork",
    "\"the cat.\"": "cat",                               # punctuation around the phrase
    "(hot dogs!)": "hot dog",
    "t-shirts": "t-shirt",                               # inner punctuation stays
    "\uff32\uff25\uff24 \uff23\uff21\uff32": "red car",  # full-width letters
    "the": "",                                           # nothing left
    "...": "",
    "  ": "",
}


@pytest.mark.parametrize("raw", sorted(CLEAN_CASES))
def test_clean_phrase(raw):
    assert clean_phrase(raw) == CLEAN_CASES[raw]


@pytest.mark.parametrize("raw", sorted(CLEAN_CASES))
def test_cleaning_twice_changes_nothing(raw):
    once = clean_phrase(raw)
    assert clean_phrase(once) == once


def _taxonomy_phrases() -> list[str]:
    doc = json.loads(resources.files("services.concepts.data").joinpath("taxonomy.json").read_text())
    out, stack = [], [doc["root"]]
    while stack:
        node = stack.pop()
        out.extend([node["name"], *node.get("synonyms", [])])
        stack.extend(node.get("children", []))
    return out


def test_the_plural_of_every_taxonomy_phrase_cleans_back_to_it():
    engine, wrong = inflect.engine(), []
    for phrase in _taxonomy_phrases():
        words = phrase.split()
        head = next((i - 1 for i, w in enumerate(words) if i > 0 and w in PREPOSITIONS), len(words) - 1)
        if words[head] in KEEP_AS_IS or phrase in ("glass", "ax"):  # "glasses" is eyewear; "axes" is "axe"
            continue
        plural = " ".join(words[:head] + [engine.plural_noun(words[head])] + words[head + 1:])
        if clean_phrase(plural) != phrase or clean_phrase(phrase) != phrase:
            wrong.append((phrase, plural, clean_phrase(plural)))
    assert not wrong


def test_clean_phrase_refuses_what_is_not_text():
    with pytest.raises(InvalidInput, match="must be text, got int"):
        clean_phrase(3)


def test_clean_labels_cleans_and_drops_repeats_in_order():
    assert clean_labels(["Dogs", "the dog", "a Red Car", "red cars", "dog's bowl"]) == ["dog", "red car", "dog bowl"]
    assert clean_labels([]) == []


# labels -> a phrase the error must contain
BAD_LABELS = {
    "nothing left": (["cat", "The"], "known label 1 'The' names nothing"),
    "only punctuation": (["?!"], "known label 0 '?!' names nothing"),
    "blank": (["cat", " "], "known label 1 is empty"),
    "not text": ([None], "known label 0 is empty or not text"),
    "one string": ("cat", "not one string"),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_bad_labels_are_invalid_input(case):
    labels, phrase = BAD_LABELS[case]
    with pytest.raises(InvalidInput, match=re.escape(phrase)):
        clean_labels(labels)


def _messy() -> Proposal:
    # Valid as a Proposal (unique case-insensitively) but not clean: repeats appear only after cleaning.
    return Proposal(
        phrases=[NounPhrase.at("Dogs", 0.75, "m", box=(1, 2, 3, 4)), NounPhrase.at("the dog", 0.5, "m", point=(9, 9)),
                 NounPhrase("Cat's", 0.25, "m"), NounPhrase("...", 0.5, "m"), NounPhrase("red cars", 0.5, "m")],
        hard_negatives=[HardNegative("Wolves", "model", 0.5, "m"), HardNegative("a wolf", "model", 0.25, "m"),
                        HardNegative("CATS", "model", 0.5, "m"), HardNegative("the", "model", 0.5, "m"),
                        HardNegative("fox", "ontology_sibling", 0.9, "m")])


def test_clean_proposal_merges_phrases_that_clean_to_one_text():
    proposal = clean_proposal(_messy(), 10, 10)
    # "Dogs" and "the dog" are one phrase: the first's place, text and source, both instances
    dog = NounPhrase("dog", 0.75, "m", (Instance((1, 2, 3, 4), None, 0.75, source="m"),
                                        Instance(None, (9, 9), 0.5, source="m")))
    assert proposal.phrases == [dog, NounPhrase("cat", 0.25, "m"), NounPhrase("red car", 0.5, "m")]
    # "cats" is a positive, so it cannot be a negative too; "the" names nothing
    assert proposal.hard_negatives == [HardNegative("wolf", "model", 0.5, "m"),
                                       HardNegative("fox", "ontology_sibling", 0.9, "m")]


def test_merging_drops_duplicate_instances_keeping_the_better():
    first = NounPhrase("dogs", 0.5, "a", (Instance((0, 0, 10, 10), score=0.5), Instance((20, 0, 30, 10), score=0.9)))
    mask = {"size": [12, 40], "counts": encode_rle(np.pad(np.ones((10, 10), bool), ((0, 2), (1, 29))))["counts"]}
    second = NounPhrase("a dog", 0.9, "b", (Instance((1, 0, 10, 10), score=0.8),  # IoU 0.9 with the first box
                                              Instance(mask=mask, score=0.5, source="sam3:x"),  # that dog again, lower
                                              Instance((50, 0, 60, 10), score=0.3)))
    [dog] = clean_proposal(Proposal([first, second]), 10, 0).phrases
    assert (dog.text, dog.score, dog.source) == ("dog", 0.9, "a")
    assert [(i.box, i.score, i.mask is not None) for i in dog.instances] == [
        ((1, 0, 10, 10), 0.8, False), ((20, 0, 30, 10), 0.9, False), ((50, 0, 60, 10), 0.3, False)]


def test_clean_proposal_caps_after_cleaning():
    proposal = clean_proposal(_messy(), 2, 1)
    assert [p.text for p in proposal.phrases] == ["dog", "cat"]
    assert [n.text for n in proposal.hard_negatives] == ["wolf"]
    assert clean_proposal(_messy(), 1, 0).hard_negatives == []  # a cap of 0 keeps none


def test_a_negative_is_dropped_even_when_its_positive_is_beyond_the_cap():
    proposal = Proposal([NounPhrase("cat"), NounPhrase("dog")], [HardNegative("dogs", "model")])
    assert clean_proposal(proposal, 1, 5) == Proposal([NounPhrase("cat")])


class MessyBackend:
    """A backend that answers the messy proposal and records what it was asked."""

    name = "messy"
    needs_pixels = False

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int, int]] = []

    def propose(self, pixels, known_labels, max_positives, max_negatives) -> Proposal:
        self.calls.append((list(known_labels), max_positives, max_negatives))
        return _messy()


def test_concepts_core_cleans_labels_before_and_every_proposal_after_the_backend():
    backend = MessyBackend()
    core = ConceptsCore(backend, settings=Settings(concepts_max_positives=2, concepts_max_negatives=1))
    proposal = core.propose(png(), ["The Dogs", "dog", "Cat's"])
    # caps of 0 are the settings' caps, given to the backend and applied to its answer
    assert backend.calls == [(["dog", "cat"], 2, 1)]
    assert [p.text for p in proposal.phrases] == ["dog", "cat"]
    assert [n.text for n in proposal.hard_negatives] == ["wolf"]
    proposal = core.propose(png(), [], max_positives=5, max_negatives=5)  # a request's caps win
    assert backend.calls[-1] == ([], 5, 5)
    assert len(proposal.phrases) == 3 and len(proposal.hard_negatives) == 2


def test_concepts_core_refuses_a_label_that_names_nothing():
    with pytest.raises(InvalidInput, match="known label 0 'the' names nothing"):
        ConceptsCore(MessyBackend()).propose(png(), ["the"])
