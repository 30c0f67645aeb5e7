"""The ``ontology`` concepts backend (offline): the item's known labels are the positives, and hard
negatives come from a shipped taxonomy of everyday objects (``data/taxonomy.json``).

For each positive, finest first: its siblings ("taxi" -> "police car"), its lookalikes (things
in other branches that pictures confuse with it, listed in the taxonomy: "person" -> "statue",
"mannequin"; a node also has its ancestors'), attribute swaps ("red car" -> "blue car"), cousins
("yellow taxi" -> "yellow school bus") and uncles ("taxi" -> "bus"). A relative keeps the
positive's colour, pattern and material where it takes them ("yellow taxi" -> "yellow sports car",
but "police car", which is never yellow). Negatives are round-robin over the positives within each
relation, so one positive with many siblings does not crowd out the others.

Relatives joined to the positive only through the root are never proposed: "animal" for "person"
or "bird" for "traffic light" share nothing but being things, and are easy negatives, which teach a
model nothing. A top-level category ("person") gets its lookalikes and attribute swaps only. The
same holds through a node marked ``loose``, whose children are worn or laid out together ("pants"
for "tie", both clothing; "fork" for "cup", both kitchenware) or are nothing alike (accessories). Nor
are group names ("mammal", "tableware": nodes marked ``group``, which organise the tree but name
nothing one would point at), nor what nearly always shares the picture with a known label, its
parts and companions (``cooccurs``: "keyboard" for "laptop", "saucer" for "cup"): a hard negative
claims the object is absent.

Never proposed, against any known label: the label itself, its synonyms, its ancestors (a "taxi"
is a "car"), its descendants ("car" may be a "taxi"), or the same category with fewer or the
same attributes ("car" for "red car"). A label the taxonomy does not know is still a positive; its
negatives come from the category its head noun names ("rusty old tractor" -> "tractor"), or none.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from services.common.concepts import HardNegative, NounPhrase, Proposal
from services.common.errors import InvalidInput
from services.common.settings import Settings
from services.concepts.phrases import PREPOSITIONS, clean_phrase

# relation -> score of its negatives, finest first: how likely the phrase is confused with the
# positive, so a verifier or a human sees the hardest ones first. Cousins share the positive's
# granularity (same depth), uncles are coarser, hence cousins before uncles though further apart.
RELATION_SCORES: dict[str, float] = {"ontology_sibling": 0.9, "ontology_lookalike": 0.85, "attribute_swap": 0.8,
                                     "ontology_cousin": 0.7, "ontology_uncle": 0.5}
# Word order of carried attributes, as English puts them: "red striped wooden chair".
KIND_ORDER = ("colour", "pattern", "material")
PARSE_CACHE = 65_536  # phrases remembered by Taxonomy.parse
# "slice of pizza" is pizza: the concept is what follows "of" (the text stays as written).
PARTITIVES = frozenset("slice piece pair bunch stack pile herd flock group".split())
# Words that end the head noun as a preposition does: "dog that is sleeping" is a dog.
RELATIVES = frozenset("that which who whose".split())
COORDINATORS = frozenset(("and", "or", "&"))
_COORDINATION = re.compile(r"\s+(?:and|or|&)\s+")


@dataclass(eq=False)
class Node:
    """One category. attributes: kind -> values its objects take (own, else inherited).
    ancestors: the names from the root down to the parent. lookalikes: nodes of other branches
    confused with it (its own, both ways, then its ancestors'), set once the tree is built.
    group: an abstract name, never a negative. cooccurs: names of the nodes that are no negative
    where it is known (listed both ways, its own and its ancestors'), set once the tree is built."""

    name: str
    synonyms: tuple[str, ...]
    attributes: dict[str, tuple[str, ...]]
    parent: "Node | None"
    ancestors: tuple[str, ...]
    children: list["Node"] = field(default_factory=list)
    lookalikes: list["Node"] = field(default_factory=list)
    group: bool = False
    loose: bool = False
    cooccurs: frozenset[str] = frozenset()
    lineage: frozenset[str] = frozenset()  # its name and its ancestors'


@dataclass(frozen=True)
class Concept:
    """A clean phrase read against the taxonomy.

    node: the category it names (None: unknown). values: the (kind, value) attributes in front of
    the category's name, canonical ("gray" -> "grey"); slots: (word index, kind, value) of each.
    modifiers: the other words (unknown adjectives, a prepositional phrase): they make the concept
    narrower than its node.
    """

    text: str
    node: Node | None = None
    slots: tuple[tuple[int, str, str], ...] = ()
    modifiers: frozenset[str] = frozenset()

    @property
    def values(self) -> frozenset[tuple[str, str]]:
        return frozenset((kind, value) for _, kind, value in self.slots)

    def covers(self, other: "Concept") -> bool:
        """True when every ``other`` is also a ``self``, for concepts of one node: "car" covers "red car"."""
        return self.values <= other.values and self.modifiers <= other.modifiers


class Taxonomy:
    """The category tree and the attribute vocabulary, from a taxonomy JSON document.

    A bad document is ``InvalidInput`` naming ``source`` and the node: names and synonyms must be
    clean phrases (``clean_phrase`` leaves them unchanged), each naming one node only.
    """

    def __init__(self, doc: Any, source: str = "taxonomy") -> None:
        self.source = source
        if not isinstance(doc, dict) or not isinstance(doc.get("root"), dict):
            raise InvalidInput(f"{source}: a taxonomy is a JSON object with a 'root' node")
        self.value_kinds: dict[str, str] = {}  # canonical attribute value -> its kind
        for kind, values in doc.get("attributes", {}).items():
            for value in values:
                self.value_kinds[value] = kind
        self.aliases: dict[str, str] = dict(doc.get("attribute_aliases", {}))
        unknown = sorted(v for v in self.aliases.values() if v not in self.value_kinds)
        if unknown:
            raise InvalidInput(f"{source}: attribute aliases name unknown values {unknown}")
        self.nodes: dict[str, Node] = {}
        self.index: dict[str, Node] = {}  # name or synonym -> node
        self._parsed: dict[str, Concept] = {}  # text -> concept: the same labels and negatives recur
        # (node, name it lists) per relation, resolved once the tree is built
        self._listed: dict[str, list[tuple[Node, str]]] = {"lookalikes": [], "cooccurs": []}
        self.root = self._build(doc["root"], None)
        self._link_lookalikes()
        self._link_cooccurs()
        # Relatives are asked for on every request: computed once here.
        self.relatives: dict[str, dict[str, list[Node]]] = {name: self._relatives(node)
                                                            for name, node in self.nodes.items()}

    @classmethod
    def load(cls, path: Path | None = None) -> "Taxonomy":
        """The taxonomy at ``path``, or the shipped one (read once per process)."""
        if path is None:
            return _shipped()
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"taxonomy {path}: {exc}") from None
        return cls(doc, str(path))

    def _build(self, spec: Any, parent: Node | None) -> Node:
        where = f"{self.source}: node under {parent.name!r}" if parent else f"{self.source}: root"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidInput(f"{where} needs a 'name'")
        shapes = {"synonyms": list, "attributes": dict, "children": list, "lookalikes": list, "cooccurs": list,
                  "group": bool, "loose": bool}
        wrong = [key for key, kind in shapes.items() if not isinstance(spec.get(key, kind()), kind)]
        if wrong:
            raise InvalidInput(f"{where}: {spec['name']!r} needs {', '.join(wrong)} as "
                               + " and ".join(shapes[k].__name__ for k in wrong))
        attributes = dict(parent.attributes) if parent else {}
        for kind, values in spec.get("attributes", {}).items():
            strays = [v for v in values if self.value_kinds.get(v) != kind]
            if strays:
                raise InvalidInput(f"{where}: {spec['name']!r} has {kind} values outside the vocabulary: {strays}")
            attributes[kind] = tuple(values)
        ancestors = (parent.ancestors + (parent.name,)) if parent else ()
        node = Node(spec["name"], tuple(spec.get("synonyms", ())), attributes, parent, ancestors,
                    group=spec.get("group", False), loose=spec.get("loose", False))
        for surface in (node.name, *node.synonyms):
            if clean_phrase(surface) != surface:
                raise InvalidInput(f"{where}: {surface!r} is not a clean phrase ({clean_phrase(surface)!r})")
            if surface in self.index:
                raise InvalidInput(f"{where}: {surface!r} names both {self.index[surface].name!r} and {node.name!r}")
            self.index[surface] = node
        self.nodes[node.name] = node
        for relation, listed in self._listed.items():
            listed += [(node, name) for name in spec.get(relation, ())]
        node.children = [self._build(child, node) for child in spec.get("children", ())]
        return node

    def _both_ways(self, relation: str) -> dict[str, list[Node]]:
        """Node name -> the nodes ``relation`` links it to, as listed (names or synonyms) and
        reversed; ``InvalidInput`` for a name of no node, or of the node's own line."""
        own: dict[str, list[Node]] = {name: [] for name in self.nodes}
        for node, name in self._listed[relation]:
            other = self.index.get(name) if isinstance(name, str) else None
            if other is None:
                raise InvalidInput(f"{self.source}: {node.name!r} lists in {relation} {name!r}, which names no node")
            if self.related(node, other):
                raise InvalidInput(f"{self.source}: {node.name!r} lists in {relation} {name!r}, which is itself, "
                                   "an ancestor or a descendant (it must be in another branch)")
            for a, b in ((node, other), (other, node)):
                if b not in own[a.name]:
                    own[a.name].append(b)
        return own

    def _chain(self, node: Node) -> list[Node]:
        """The node, then its ancestors, nearest first."""
        return [node] + [self.nodes[name] for name in reversed(node.ancestors)]

    def _link_lookalikes(self) -> None:
        """Each node's lookalikes, then its ancestors' (nearest first): a "poodle" is confused with
        a "stuffed animal" as a "dog" is."""
        own = self._both_ways("lookalikes")
        for node in self.nodes.values():
            node.lookalikes = list(dict.fromkeys(n for link in self._chain(node) for n in own[link.name]))

    def _link_cooccurs(self) -> None:
        """Each node's companions with its ancestors' ("teacup" has the "saucer" of "cup")."""
        own = self._both_ways("cooccurs")
        for node in self.nodes.values():
            node.lineage = frozenset((node.name, *node.ancestors))
            node.cooccurs = frozenset(n.name for link in self._chain(node) for n in own[link.name])

    @staticmethod
    def cooccur(a: Node, b: Node) -> bool:
        """True when ``a`` (or an ancestor) is a listed companion of ``b`` (or of an ancestor)."""
        return not a.lineage.isdisjoint(b.cooccurs)

    @staticmethod
    def _relatives(node: Node) -> dict[str, list[Node]]:
        """Relation -> nodes, the tree's relations only where their common ancestor is neither the
        root nor loose; group names left out (a group's children still are cousins)."""

        def joins(ancestor: Node | None) -> bool:
            return ancestor is not None and ancestor.parent is not None and not ancestor.loose

        parent = node.parent
        grandparent = parent.parent if parent is not None else None
        siblings = [n for n in parent.children if n is not node] if joins(parent) else []
        uncles = [n for n in grandparent.children if n is not parent] if joins(grandparent) else []
        relatives = {"ontology_sibling": siblings, "ontology_lookalike": list(node.lookalikes),
                     "ontology_cousin": [c for u in uncles for c in u.children], "ontology_uncle": uncles}
        return {reason: [n for n in nodes if not n.group] for reason, nodes in relatives.items()}

    def related(self, a: Node, b: Node) -> bool:
        """True when one is the other or an ancestor of it (a synonym names the same node)."""
        return a is b or a.name in b.ancestors or b.name in a.ancestors

    def categories(self) -> list[str]:
        """The names of its concrete categories (no abstract group), in tree order: the vocabulary
        a grounding backend looks for."""
        return [name for name, node in self.nodes.items() if not node.group and node is not self.root]

    def parse(self, text: str) -> Concept:
        """Read a phrase: the longest tail of its head (the words before a preposition) that names
        a node, attribute words in front of it, the rest modifiers. No such tail: an unknown concept."""
        concept = self._parsed.get(text)
        if concept is None:
            if len(self._parsed) >= PARSE_CACHE:
                self._parsed.clear()
            concept = self._parsed[text] = self._parse(clean_phrase(text))
        return concept

    def _parse(self, text: str) -> Concept:
        words = text.split()
        if len(words) > 2 and words[0] in PARTITIVES and words[1] == "of":
            rest = self._parse(" ".join(words[2:]))
            if rest.node is not None:  # the amount narrows the concept, as a modifier does
                return Concept(text, rest.node, tuple((i + 2, kind, value) for i, kind, value in rest.slots),
                               rest.modifiers | {words[0]})
        # A name may hold a preposition ("chest of drawers"): tails end before any preposition,
        # relative pronoun or participle that follows a name ("man riding a horse" is a man), or at
        # the end, longest first; they start within the head ("man in red shirt" is a man).
        ends = [len(words)] + [i for i in range(len(words) - 1, 0, -1) if words[i] in PREPOSITIONS
                               or words[i] in RELATIVES or (words[i].endswith("ing") and self._names_tail(words[:i]))]
        for start in range(ends[-1]):
            for end in ends:
                node = self.index.get(" ".join(words[start:end]))
                if node is not None:
                    return self._read(text, words, start, end, node)
        return Concept(text)

    def present(self, texts: Sequence[str]) -> list[Concept]:
        """What phrases known to be in an image say is there: each phrase as read, and each side
        of a coordination of things ("dogs and cats" also names "dog" and "cat"; "red and white
        bus", whose "red" names nothing, is one bus). The sides only block negatives; they make
        none, as "fish and chips" is no fish."""
        concepts = []
        for text in texts:
            concepts.append(self.parse(text))
            if any(word in COORDINATORS for word in text.split()):
                sides = [self.parse(clean_phrase(side)) for side in _COORDINATION.split(text)]
                if all(side.node is not None for side in sides):
                    concepts += sides
        return concepts

    def _names_tail(self, words: list[str]) -> bool:
        """True when the last words name a node ("man" in "old man", before "riding")."""
        return any(" ".join(words[k:]) in self.index for k in range(len(words)))

    def _read(self, text: str, words: list[str], start: int, end: int, node: Node) -> Concept:
        slots, modifiers = [], set(words[end:])
        for i, word in enumerate(words[:start]):
            value = self.aliases.get(word, word)
            if value in self.value_kinds:
                slots.append((i, self.value_kinds[value], value))
            else:
                modifiers.add(word)
        return Concept(text, node, tuple(slots), frozenset(modifiers))


@lru_cache(maxsize=1)
def _shipped() -> Taxonomy:
    text = resources.files("services.concepts.data").joinpath("taxonomy.json").read_text(encoding="utf-8")
    return Taxonomy(json.loads(text), "services/concepts/data/taxonomy.json")


def conflicts(candidate: Concept, known: Concept, taxonomy: Taxonomy) -> bool:
    """True when ``candidate`` must not be a hard negative of the image that holds ``known``:
    the same text, a related node (itself, a synonym, an ancestor, a descendant), unless it is
    the same node with attributes that neither covers ("blue car" against "red car"), or a
    listed companion ("keyboard" where a "laptop" is)."""
    if candidate.text == known.text:
        return True
    if candidate.node is None or known.node is None:
        return False
    if candidate.node is known.node:
        return candidate.covers(known) or known.covers(candidate)
    return taxonomy.related(candidate.node, known.node) or taxonomy.cooccur(candidate.node, known.node)


def drop_contradictions(proposal: Proposal, known_labels: Sequence[str], taxonomy: Taxonomy,
                        max_negatives: int) -> Proposal:
    """``proposal`` without the hard negatives that contradict what is in the image, read
    against ``taxonomy``: a known label or a positive, its synonym ("puppy" for "dog"), ancestor
    ("animal"), descendant or listed companion (``conflicts``); then capped at ``max_negatives``.
    A phrase the taxonomy does not know contradicts only its own text. For every backend: a
    model may well propose the label it was told is there as a negative."""
    present = taxonomy.present([*known_labels, *(p.text for p in proposal.phrases)])
    kept = [n for n in proposal.hard_negatives
            if not any(conflicts(taxonomy.parse(n.text), known, taxonomy) for known in present)]
    return Proposal(proposal.phrases, kept[:max(max_negatives, 0)])


class OntologyBackend:
    """Positives: the known labels (score 1.0, image-level). Hard negatives: see the module docstring.

    max_positives, max_negatives: caps used when a request gives 0. max_swaps: attribute swaps per
    attribute of a positive, so one vocabulary does not crowd out the tree's negatives.
    """

    name = "ontology"
    needs_pixels = False

    def __init__(self, taxonomy: Taxonomy | None = None, max_positives: int = 20, max_negatives: int = 20,
                 max_swaps: int = 3) -> None:
        self.taxonomy = taxonomy if taxonomy is not None else Taxonomy.load()
        self.max_positives, self.max_negatives, self.max_swaps = max_positives, max_negatives, max_swaps

    @classmethod
    def from_settings(cls, settings: Settings) -> "OntologyBackend":
        return cls(Taxonomy.load(settings.concepts_taxonomy), settings.concepts_max_positives,
                   settings.concepts_max_negatives)

    def propose(self, pixels: np.ndarray | None, known_labels: Sequence[str], max_positives: int = 0,
                max_negatives: int = 0) -> Proposal:
        """pixels: ignored (None). known_labels: clean phrases; an empty list is a valid request
        with an empty proposal (nothing is known to be in the image, so nothing can be contrasted)."""
        positives_cap = max_positives or self.max_positives
        negatives_cap = max_negatives or self.max_negatives
        known: list[Concept] = []
        for label in known_labels:  # ConceptsCore gives clean unique labels; a direct caller may not
            concept = self.taxonomy.parse(label)
            if concept.text and all(concept.text != k.text for k in known):
                known.append(concept)
        kept = known[:positives_cap]
        phrases = [NounPhrase(c.text, 1.0, self.name) for c in kept]
        present = self.taxonomy.present([c.text for c in known])
        negatives: list[HardNegative] = []
        seen = set()
        for reason, text in self._ranked(kept):
            if len(negatives) >= negatives_cap:
                break
            if text in seen:
                continue
            seen.add(text)
            # Checked as the taxonomy reads the text ("brown" + "bear" is the node "brown bear"), and
            # against every known label, even one beyond the positives' cap: it is in the image.
            candidate = self.taxonomy.parse(text)
            if not any(conflicts(candidate, k, self.taxonomy) for k in present):
                negatives.append(HardNegative(text, reason, RELATION_SCORES[reason], self.name))
        return Proposal(phrases, negatives)

    def _ranked(self, positives: list[Concept]) -> Iterator[tuple[str, str]]:
        """(reason, text), finest relation first; within one, round-robin over the positives."""
        for reason in RELATION_SCORES:
            lists = [self._candidates(p, reason) for p in positives if p.node is not None]
            for rank in range(max((len(c) for c in lists), default=0)):
                for candidates in lists:
                    if rank < len(candidates):
                        yield reason, candidates[rank]

    def _candidates(self, positive: Concept, reason: str) -> list[str]:
        if reason == "attribute_swap":
            return self._swaps(positive)
        carried: dict[str, str] = {}
        for _, kind, value in positive.slots:
            carried.setdefault(kind, value)  # one value per kind: "red and white bus" carries "red"
        order = sorted(carried, key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER))
        return [" ".join([carried[k] for k in order if carried[k] in other.attributes.get(k, ())] + [other.name])
                for other in self.taxonomy.relatives[positive.node.name][reason]]

    def _swaps(self, positive: Concept) -> list[str]:
        """The positive's text with one attribute word replaced: "old red tractor" -> "old blue tractor"."""
        words = positive.text.split()
        out = []
        for index, kind, value in positive.slots:
            taken = {v for k, v in positive.values if k == kind}  # "red and white bus": not "red and red bus"
            for option in [v for v in positive.node.attributes.get(kind, ()) if v not in taken][:self.max_swaps]:
                out.append(" ".join(words[:index] + [option] + words[index + 1:]))
        return out
