"""Noun-phrase cleaning, applied to the caller's known labels and to every backend's proposal.

A clean phrase is lower-case, its head noun singular, without possessives, leading articles,
determiners, numbers or quantities, with single spaces and no punctuation around it, "grey" for
"gray": "The Dogs' Bowls." -> "dog bowl", "two wine glasses" -> "wine glass", "people on bikes" ->
"person on bikes", "3 gray cats" -> "grey cat", "lots of people" -> "person".
Later stages key their results by phrase text, so two spellings of one concept must become one
string, and a phrase proposed both present and absent would contradict itself.
"""

from __future__ import annotations

import unicodedata
from dataclasses import replace
from functools import lru_cache
from typing import Sequence

from services.common.concepts import NounPhrase, Proposal
from services.common.errors import InvalidInput
from services.common.limits import Limits

# Dropped from the front of a phrase: they count or point at the object, they do not name it.
LEADING_WORDS = frozenset((
    "a an the this that these those some any another each every all both either several many few "
    "my your his her its our their one two three four five six seven eight nine ten eleven twelve"
).split())

# Dropped from the front with the "of" after them: an amount, not the object ("a couple of dogs").
QUANTITIES = frozenset("couple lot lots plenty number dozen dozens handful".split())

# One spelling per word, so "gray cat" and "grey cat" are one phrase (the taxonomy's spelling).
SPELLINGS = {"gray": "grey"}

# The head noun of "cup of coffee" or "man in red shirt" is the word before the first of these.
PREPOSITIONS = frozenset((
    "of in on with without at near next by for from into onto over above below under underneath "
    "behind beside besides between inside outside against along around across through beneath atop"
).split())

# Kept as written: plural-only nouns (one pair of "scissors") and singulars ending in "s" that
# inflect would cut ("bus" -> "bu", "glasses" -> "glass", "tennis" -> "tenni").
KEEP_AS_IS = frozenset((
    "bus gas lens atlas canvas christmas iris tennis trellis axis mantis pelvis ibis debris chassis "
    "rhinoceros dice species series news means "
    "glasses sunglasses eyeglasses spectacles goggles binoculars scissors pliers tongs tweezers "
    "pants jeans shorts trousers sweatpants tights leggings overalls pajamas pyjamas clothes "
    "headphones earphones stairs "
    "thermos gps goods bias paris texas chaos cosmos pancreas billiards gymnastics athletics electronics "
    "physics mathematics data"
).split())

# Plurals inflect gets wrong or that look singular here: nouns ending in "u" take "us", which
# the rule for "cactus" would keep.
IRREGULAR = {"cacti": "cactus", "octopi": "octopus", "fungi": "fungus", "menus": "menu", "emus": "emu",
             "gnus": "gnu", "tutus": "tutu", "gurus": "guru", "haikus": "haiku", "tofus": "tofu",
             "tiramisus": "tiramisu", "caribous": "caribou", "bayous": "bayou", "bureaus": "bureau",
             "plateaus": "plateau"}

# Nouns ending in "ie", whose plural inflect reads as "y" ("hoodies" -> "hoody").
IE_NOUNS = frozenset(
    "hoagie smoothie hoodie beanie plushie brownie selfie onesie goalie zombie pixie rookie bootie birdie".split())

# "glasses" is eyewear, unless a drink or a use precedes it: "wine glasses" -> "wine glass".
GLASS_WORDS = frozenset(
    "wine drinking beer water shot champagne cocktail martini juice milk whiskey whisky magnifying".split())



@lru_cache(maxsize=1)
def _engine():
    import inflect  # imported on first use: the import takes about a second (it instruments its code)

    return inflect.engine()


@lru_cache(maxsize=8192)
def _inflect_singular(word: str) -> str:
    result = _engine().singular_noun(word)  # False when inflect thinks the word is singular already
    return result if isinstance(result, str) and result else word


def singular(word: str, previous: str = "") -> str:
    """The singular of a lower-case noun; ``previous`` is the word before it in the phrase ("" if none)."""
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word == "glasses" and previous in GLASS_WORDS:
        return "glass"
    if word.endswith("ies") and word[:-1] in IE_NOUNS:
        return word[:-1]
    # Nouns ending in "us", "sis", "ss" are singular ("cactus", "oasis", "grass"); their plurals
    # end in "es" ("buses", "oases") and still reach inflect.
    if word in KEEP_AS_IS or len(word) < 3 or word.endswith(("us", "sis", "ss")) or not word[-1].isalpha():
        return word
    return _inflect_singular(word)


def _strip_punctuation(text: str) -> str:
    start, end = 0, len(text)
    while start < end and not text[start].isalnum():
        start += 1
    while end > start and not text[end - 1].isalnum():
        end -= 1
    return text[start:end]


def _drop_possessive(word: str) -> tuple[str, bool]:
    """("dogs", True) for "dogs'", ("children", True) for "children's", ("james", False) for
    "james's": the word, and whether it may be a plural possessor (whose singular is wanted). Before
    "'s" only an irregular plural is ("men's"); a word ending in "s" there is singular ("boss's")."""
    if word.endswith("'s") and len(word) > 2:
        return word[:-2], not word[:-2].endswith("s")
    if word.endswith("s'") and len(word) > 2:
        return word[:-1], True
    return word, False


def clean_phrase(text: str) -> str:
    """The clean form of one noun phrase (see the module docstring); "" when nothing is left
    (only articles, numbers or punctuation). Not text is ``InvalidInput``."""
    if not isinstance(text, str):
        raise InvalidInput(f"a noun phrase must be text, got {type(text).__name__}")
    return _clean(text)


@lru_cache(maxsize=65_536)  # labels and negatives recur across images
def _clean(text: str) -> str:
    # NFKC folds full-width letters and ligatures; typographic apostrophes become ASCII ones.
    text = unicodedata.normalize("NFKC", text).replace("\u2019", "'").replace("\u2018", "'").lower()
    # A model's control characters (NUL, ESC ...) separate words at most; none survives.
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    words: list[str] = []
    for raw in _strip_punctuation(" ".join(text.split())).split():
        if raw in ("'s", "'"):  # a possessive split off by a tokenizer: "dog 's bowl"
            continue
        word, plural_possessor = _drop_possessive(raw)
        # A possessor becomes a noun modifier, singular as in "dog bowl", "child seat".
        words.append(singular(word, words[-1] if words else "") if plural_possessor else word)
    words = _drop_leading(words)
    if not words:
        return ""
    words = [SPELLINGS.get(w, w) for w in words]
    head = next((i - 1 for i, w in enumerate(words) if i > 0 and w in PREPOSITIONS), len(words) - 1)
    if words[head] == "glasses" and head + 1 < len(words) and words[head + 1] == "of":  # "glasses of water"
        words[head] = "glass"
    words[head] = singular(words[head], words[head - 1] if head > 0 else "")
    for i in range(head - 1):  # each side of a coordination is a head too: "dogs and cats"
        if words[i + 1] in ("and", "or", "&"):
            words[i] = singular(words[i], words[i - 1] if i > 0 else "")
    return " ".join(words)


def _drop_leading(words: list[str]) -> list[str]:
    """Without the counting words in front: articles, determiners, numbers ("2", "two") and
    amounts ("a couple of", "lots of"), until the words that name the object."""
    while True:
        while words and (words[0] in LEADING_WORDS or words[0].isdigit()):
            words = words[1:]
        if len(words) > 2 and words[0] in QUANTITIES and words[1] == "of":
            words = words[2:]
            continue
        return _strip_punctuation(" ".join(words)).split()


def clean_labels(known_labels: Sequence[str], limits: Limits = Limits()) -> list[str]:
    """The caller's known labels, cleaned, without repeats (the first wins, order kept).

    An empty, non-text or nothing-left label ("the", "!!") is ``InvalidInput`` naming its index:
    it is a caller's mistake, not a phrase. An empty list is valid (nothing is known).
    """
    labels: list[str] = []
    for i, label in enumerate(limits.check_labels(known_labels)):
        text = clean_phrase(label)
        if not text:
            raise InvalidInput(f"known label {i} {label!r:.100} names nothing once articles, numbers and "
                               "punctuation are removed")
        if text not in labels:
            labels.append(text)
    return labels


def clean_proposal(proposal: Proposal, max_positives: int, max_negatives: int) -> Proposal:
    """``proposal`` with every text cleaned, capped at ``max_positives`` phrases and
    ``max_negatives`` hard negatives (0 keeps none).

    Phrases that clean to the same text are one phrase ("dogs", "the dog"): the first keeps its
    place, text and source, the instances of all are joined with duplicates (box IoU >=
    ``DUPLICATE_IOU``) removed, and the highest score stays. A phrase with nothing left is dropped,
    and so is a hard negative that is also a positive (even one beyond the cap: the backend said it
    is present); of repeated negatives the first wins.
    """
    by_text: dict[str, NounPhrase] = {}
    for phrase in proposal.phrases:
        text = clean_phrase(phrase.text)
        if not text:
            continue
        phrase = phrase if text == phrase.text else replace(phrase, text=text)
        by_text[text] = by_text[text].merged(phrase) if text in by_text else phrase
    seen = set(by_text)
    negatives = []
    for negative in proposal.hard_negatives:
        text = clean_phrase(negative.text)
        if text and text not in seen:
            seen.add(text)
            negatives.append(negative if text == negative.text else replace(negative, text=text))
    return Proposal(list(by_text.values())[:max(max_positives, 0)], negatives[:max(max_negatives, 0)])
