"""The ontology concepts backend: the shipped taxonomy, fine-grained hard negatives on known
cases, a property over the whole taxonomy (no negative is ever a positive, a synonym, an
ancestor or a descendant of one), unknown labels, and the backend through ConceptsCore, the
pipeline step and the ``concepts`` command."""

from __future__ import annotations

import json
import random
import re
from importlib import resources

import pytest
import typer
from typer.testing import CliRunner

from services.common.concepts import Proposal
from services.common.errors import InvalidInput
from services.common.keys import step_key
from services.common.pb import common_pb2, concepts_pb2, concepts_pb2_grpc
from services.common.settings import Settings
from services.common.steps import StepRequest, run_step
from services.app import concepts_commands as commands
from services.concepts import core as concepts_core
from services.concepts.core import ConceptsCore, make_backend
from services.concepts.ontology import RELATION_SCORES, OntologyBackend, Taxonomy
from services.concepts.phrases import clean_phrase
from services.concepts.servicer import add_to_server
from services.concepts.step import make_handler
from tests.common.image_cases import png
from tests.servers import grpc_loopback

# The 80 COCO categories, as COCO spells them.
COCO = ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
        "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
        "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
        "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
        "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
        "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
        "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
        "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
        "teddy bear", "hair drier", "toothbrush")


class RawTaxonomy:
    """The shipped JSON read here, independently of the module under test: node by surface,
    parent by node, attribute values by kind (inherited), so the property checks the data itself."""

    def __init__(self) -> None:
        doc = json.loads(resources.files("services.concepts.data").joinpath("taxonomy.json").read_text())
        self.surface: dict[str, str] = {}
        self.parent: dict[str, str | None] = {}
        self.attributes: dict[str, dict[str, list[str]]] = {}
        self.leaves: list[str] = []
        self.vocab = {v: kind for kind, values in doc["attributes"].items() for v in values}
        stack = [(doc["root"], None)]
        while stack:
            node, parent = stack.pop()
            name = node["name"]
            self.parent[name] = parent
            self.attributes[name] = {**(self.attributes[parent] if parent else {}), **node.get("attributes", {})}
            for s in (name, *node.get("synonyms", [])):
                self.surface[s] = name
            if not node.get("children"):
                self.leaves.append(name)
            stack.extend((child, name) for child in node.get("children", []))

    def ancestors(self, name: str) -> set[str]:
        out, parent = set(), self.parent[name]
        while parent is not None:
            out.add(parent)
            parent = self.parent[parent]
        return out

    def read(self, text: str) -> tuple[str, frozenset[str]]:
        """(node, attribute values) of a phrase made of attribute words and a node's name or synonym."""
        words = text.split()
        for k in range(len(words)):
            rest = " ".join(words[k:])
            if rest in self.surface and all(w in self.vocab for w in words[:k]):
                return self.surface[rest], frozenset(words[:k])
        raise AssertionError(f"{text!r} is not a taxonomy phrase")


@pytest.fixture(scope="module")
def raw() -> RawTaxonomy:
    return RawTaxonomy()


@pytest.fixture(scope="module")
def backend() -> OntologyBackend:
    return OntologyBackend(max_negatives=20)


def negatives(backend: OntologyBackend, labels: list[str], n: int = 20) -> list[tuple[str, str]]:
    return [(h.text, h.reason) for h in backend.propose(None, labels, 0, n).hard_negatives]


# -- the shipped taxonomy ---------------------------------------------------------------------

def test_taxonomy_ships_as_package_data_and_covers_coco(raw):
    from setuptools import find_packages

    assert "services.concepts.data" in find_packages(include=["services*"])  # so the JSON is installed
    assert len(raw.leaves) >= 250
    missing = [name for name in COCO if clean_phrase(name) not in raw.surface]
    assert len(set(COCO)) == 80 and not missing
    taxonomy = Taxonomy.load()
    assert len(taxonomy.nodes) == len(raw.parent) and taxonomy.parse("skis").node.name == "ski"


def _doc(**root) -> dict:
    return {"attributes": {"colour": ["red", "blue"]}, "attribute_aliases": {"crimson": "red"},
            "root": {"name": "thing", "attributes": {"colour": ["red", "blue"]}, **root}}


# a broken document -> a phrase the error must contain
BAD_TAXONOMIES = {
    "no root": ({"attributes": {}}, "with a 'root' node"),
    "node without name": (_doc(children=[{"synonyms": ["x"]}]), "node under 'thing' needs a 'name'"),
    "repeated surface": (_doc(children=[{"name": "cup"}, {"name": "mug", "synonyms": ["cup"]}]),
                         "'cup' names both 'cup' and 'mug'"),
    "plural name": (_doc(children=[{"name": "cups"}]), "'cups' is not a clean phrase ('cup')"),
    "upper case synonym": (_doc(children=[{"name": "cup", "synonyms": ["Mug"]}]), "'Mug' is not a clean phrase"),
    "value outside vocabulary": (_doc(children=[{"name": "cup", "attributes": {"colour": ["teal"]}}]),
                                 "colour values outside the vocabulary: ['teal']"),
    "synonyms as text": (_doc(children=[{"name": "cup", "synonyms": "mug"}]), "'cup' needs synonyms as list"),
    "alias to nothing": ({**_doc(), "attribute_aliases": {"navy": "dark blue"}}, "unknown values ['dark blue']"),
    "lookalike of nothing": (_doc(children=[{"name": "cup", "lookalikes": ["grail"]}]),
                             "'cup' lists in lookalikes 'grail', which names no node"),
    "lookalike in its own line": (_doc(children=[{"name": "cup", "children": [{"name": "teacup", "lookalikes": ["cup"]}]}]),
                                  "'teacup' lists in lookalikes 'cup', which is itself, an ancestor or a descendant"),
    "companion of nothing": (_doc(children=[{"name": "cup", "cooccurs": ["saucers"]}]),
                             "'cup' lists in cooccurs 'saucers', which names no node"),
    "group as text": (_doc(children=[{"name": "cup", "group": "yes"}]), "'cup' needs group as bool"),
    "lookalikes as text": (_doc(children=[{"name": "cup", "lookalikes": "mug"}]), "'cup' needs lookalikes as list"),
}


@pytest.mark.parametrize("case", sorted(BAD_TAXONOMIES))
def test_a_broken_taxonomy_names_the_problem(case):
    doc, phrase = BAD_TAXONOMIES[case]
    with pytest.raises(InvalidInput, match=re.escape(phrase)):
        Taxonomy(doc, "mine.json")


def test_a_custom_taxonomy_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_doc(children=[{"name": "tableware", "children": [{"name": "cup"}, {"name": "mug"}]}])))
    assert OntologyBackend(Taxonomy.load(path)).propose(None, ["crimson cup"]).hard_negatives[0].text == "red mug"
    with pytest.raises(InvalidInput, match="taxonomy .*missing.json"):
        Taxonomy.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(InvalidInput, match="bad.json"):
        Taxonomy.load(tmp_path / "bad.json")


# -- known cases ------------------------------------------------------------------------------

def test_yellow_taxi_gets_fine_grained_negatives_before_coarse_ones(backend):
    found = negatives(backend, ["yellow taxi"], 40)
    texts = [t for t, _ in found]
    # siblings of taxi carry its colour where they come in it ("police car" never is yellow)
    assert found[:3] == [("police car", "ontology_sibling"), ("yellow sports car", "ontology_sibling"),
                         ("yellow race car", "ontology_sibling")]
    assert ("white taxi", "attribute_swap") in found
    assert ("yellow school bus", "ontology_cousin") in found
    assert texts.index("yellow school bus") < texts.index("yellow bus")  # cousin before uncle
    reasons = [r for _, r in found]
    assert reasons == sorted(reasons, key=list(RELATION_SCORES).index)  # finest relation first
    # a taxi is a car, a road vehicle, a vehicle: never absent where a taxi is
    assert not {"taxi", "cab", "car", "yellow car", "automobile", "road vehicle", "vehicle"} & set(texts)


# label -> (negatives it must get, negatives it must never get)
KNOWN_CASES = {
    "german shepherd": ({"poodle", "beagle"}, {"dog", "puppy", "canine", "german shepherd", "alsatian"}),
    "cab": ({"police car", "limousine"}, {"taxi", "taxicab", "car", "automobile"}),  # a synonym's relatives
    "school bus": ({"double-decker bus", "minibus"}, {"bus", "autobus", "road vehicle", "vehicle"}),
    "chests of drawers": ({"wardrobe", "bookcase"}, {"dresser", "bureau", "storage furniture", "furniture"}),
    "man in red shirt": ({"woman", "girl"}, {"man", "guy", "adult", "person"}),
    "sunglasses": ({"goggles"}, {"sunglasses", "eyewear", "accessory"}),
    "teddy bear": ({"stuffed bunny", "bear"}, {"stuffed animal", "toy"}),
    "man riding a horse": ({"woman", "boy"}, {"man", "person", "zebra"}),  # a participle ends the head
    "dog that is sleeping": ({"wolf", "fox"}, {"dog", "puppy"}),             # so does a relative pronoun
    "slice of pizza": ({"hamburger", "sandwich"}, {"pizza"}),               # an amount of pizza is pizza
    "wooden building with windows": ({"wooden tower"}, {"building", "wooden building"}),
    "dogs and cats": ({"lion", "wolf"}, {"dog", "cat", "puppy", "kitten"}),  # both sides are in the image
}


@pytest.mark.parametrize("label", sorted(KNOWN_CASES))
def test_known_cases(backend, label):
    wanted, never = KNOWN_CASES[label]
    texts = {t for t, _ in negatives(backend, [clean_phrase(label)], 100)}
    assert wanted <= texts and not never & texts


def test_scores_follow_the_relation(backend):
    proposal = backend.propose(None, ["red car"], 0, 60)
    assert {(n.reason, n.score) for n in proposal.hard_negatives} == set(RELATION_SCORES.items())
    assert [(p.text, p.score, p.source) for p in proposal.phrases] == [("red car", 1.0, "ontology")]


def test_attribute_swaps_change_one_attribute_and_keep_the_other_words(backend):
    found = negatives(backend, ["red car", "old gray tractor"], 60)
    swaps = [t for t, r in found if r == "attribute_swap"]
    assert "blue car" in swaps and "old red tractor" in swaps
    assert "old grey tractor" not in swaps and "red car" not in swaps  # "gray" is "grey": no swap to itself
    swaps = [t for t, r in negatives(backend, ["red and white bus"], 60) if r == "attribute_swap"]
    assert "blue and white bus" in swaps and "red and blue bus" in swaps and "red and red bus" not in swaps


def test_no_descendant_of_a_positive(backend, raw):
    for label in ("vehicle", "car", "animal", "dog"):
        for text, _ in negatives(backend, [label], 100):
            node, _ = raw.read(text)
            assert raw.surface[label] not in raw.ancestors(node) | {node}, (label, text)


def test_a_more_general_label_blocks_the_swaps_it_covers(backend, raw):
    # "blue car" is a car: absent it cannot be where a "car" is known
    texts = [t for t, _ in negatives(backend, ["red car", "car"], 100)]
    assert "blue car" in [t for t, _ in negatives(backend, ["red car"], 100)]
    assert texts and not [t for t in texts if raw.read(t)[0] == "car"]


def test_negatives_round_robin_over_positives_within_a_relation(backend):
    assert negatives(backend, ["dog", "car"], 4) == [("wolf", "ontology_sibling"), ("bus", "ontology_sibling"),
                                                     ("fox", "ontology_sibling"), ("truck", "ontology_sibling")]


def test_known_labels_beyond_the_positive_cap_still_block_negatives(backend):
    proposal = backend.propose(None, ["taxi", "police car"], max_positives=1, max_negatives=50)
    assert [p.text for p in proposal.phrases] == ["taxi"]
    assert "police car" not in [n.text for n in proposal.hard_negatives]
    assert len(backend.propose(None, ["taxi"], 0, 3).hard_negatives) == 3


def test_lookalikes_from_other_branches_both_ways_and_inherited(backend):
    person = negatives(backend, ["person"], 100)
    assert person == [(t, "ontology_lookalike") for t in ("statue", "mannequin", "scarecrow", "doll")]
    assert ("person", "ontology_lookalike") in negatives(backend, ["statue"], 100)  # listed once, both ways
    assert ("stuffed animal", "ontology_lookalike") in negatives(backend, ["poodle"], 100)  # a dog's
    texts = [t for t, _ in negatives(backend, ["yellow taxi"], 100)]
    assert "yellow toy car" in texts and texts.index("limousine") < texts.index("yellow toy car") < \
        texts.index("white taxi")  # after the siblings, before the attribute swaps


def test_no_relative_joined_only_through_the_root(backend, raw):
    """"animal" for "person", "bird" for "traffic light": easy negatives. Every tree relative of
    every node shares an ancestor below the root with it; only listed lookalikes cross over."""
    root = next(name for name, parent in raw.parent.items() if parent is None)
    for name in raw.parent:
        if name == root:
            continue
        for text, reason in negatives(backend, [name], 100):
            if reason in ("ontology_lookalike", "attribute_swap"):
                continue
            node, _ = raw.read(text)
            shared = (raw.ancestors(node) | {node}) & (raw.ancestors(name) | {name})
            assert shared - {root}, f"{text!r} ({reason}) for {name!r} shares only the root"


# a known label -> negatives it must never get: its parts and companions, listed either way
COMPANIONS = {
    "laptop": {"keyboard", "computer mouse"},
    "keyboard": {"laptop", "desktop computer"},       # listed on the computers, both ways
    "tennis racket": {"tennis ball"},
    "teacup": {"saucer", "teapot"},                   # a cup's companions, inherited
    "fork": {"knife", "spoon", "plate"},
    "tv": {"remote"},
}


@pytest.mark.parametrize("label", sorted(COMPANIONS))
def test_companions_are_never_negatives(backend, label):
    texts = {t for t, _ in negatives(backend, [label], 200)}
    assert texts and not COMPANIONS[label] & texts, COMPANIONS[label] & texts


def test_group_names_are_never_negatives(backend):
    doc = json.loads(resources.files("services.concepts.data").joinpath("taxonomy.json").read_text())
    groups, stack = set(), [doc["root"]]
    while stack:
        node = stack.pop()
        if node.get("group"):
            groups.add(node["name"])
        stack.extend(node.get("children", []))
    assert {"mammal", "tableware", "footwear"} <= groups
    for label in ("bird", "elephant", "tv", "bed", "tie", "hair drier", "dog", "cup"):
        texts = {t for t, _ in negatives(backend, [label], 200)}
        assert texts and not groups & texts, (label, groups & texts)


# -- property: over many positives drawn from the whole taxonomy ------------------------------

def test_no_negative_is_a_positive_synonym_ancestor_or_descendant(backend, raw):
    rng = random.Random(0)
    surfaces = sorted(raw.surface)
    for _ in range(400):
        positives = []
        for _ in range(rng.randint(1, 4)):
            text = rng.choice(surfaces)
            colours = raw.attributes[raw.surface[text]].get("colour", [])
            if colours and rng.random() < 0.4:
                text = f"{rng.choice(colours)} {text}"
            positives.append(text)
        read = [raw.read(p) for p in positives]
        proposal = backend.propose(None, positives, 0, 60)
        assert [p.text for p in proposal.phrases] == list(dict.fromkeys(positives))
        for negative in proposal.hard_negatives:
            node, values = raw.read(negative.text)
            assert negative.score == RELATION_SCORES[negative.reason]
            for text, (p_node, p_values) in zip(positives, read):
                where = f"{negative.text!r} ({negative.reason}) against positive {text!r}"
                assert negative.text != text, where
                assert node not in raw.ancestors(p_node), f"ancestor: {where}"
                assert p_node not in raw.ancestors(node), f"descendant: {where}"
                if node == p_node:  # a synonym, or an attribute swap: neither may cover the other
                    assert values and not values <= p_values and not p_values <= values, f"synonym: {where}"


# -- unknown labels and empty requests --------------------------------------------------------

def test_unknown_labels_are_positives_with_negatives_from_their_head_noun(backend):
    proposal = backend.propose(None, ["rusty old tractor", "zorb"])
    assert [p.text for p in proposal.phrases] == ["rusty old tractor", "zorb"]
    texts = [n.text for n in proposal.hard_negatives]
    assert texts[0] == "bulldozer" and "tractor" not in texts  # a rusty old tractor is a tractor
    assert backend.propose(None, ["zorb"]).hard_negatives == []  # nothing known about it
    assert backend.propose(None, ["dog kennel"]).hard_negatives == []  # a kennel is no dog: nothing known


def test_an_empty_label_list_is_an_empty_proposal(backend, local_store):
    assert backend.propose(None, []) == Proposal()
    assert ConceptsCore("ontology", local_store).propose(png(), []) == Proposal()


# -- through the core, the pipeline step and the command --------------------------------------

def test_ontology_through_concepts_core(local_store):
    assert isinstance(make_backend("ontology"), OntologyBackend)
    core = ConceptsCore("ontology", local_store, settings=Settings(concepts_max_negatives=5))
    local_store.put("uploads/street.png", png())
    proposal = core.propose("uploads/street.png", ["Yellow Taxis", "the dog's bowl", "yellow taxi"])
    assert [p.text for p in proposal.phrases] == ["yellow taxi", "dog bowl"]
    assert len(proposal.hard_negatives) == 5 and proposal.hard_negatives[0].text == "police car"
    assert len(core.propose(png(), ["dog"], max_negatives=2).hard_negatives) == 2


def test_ontology_over_grpc(local_store):
    core = ConceptsCore("labels", local_store)  # the request names the backend
    with grpc_loopback(lambda s: add_to_server(s, core), 4 << 20) as (channel, _):
        reply = concepts_pb2_grpc.ConceptsStub(channel).Propose(concepts_pb2.ProposeRequest(
            image=common_pb2.ImageRef(data=png()), known_labels=["Red Cars"], max_negatives=2, backend="ontology"),
            timeout=10)
    proposal = Proposal.from_proto(reply)
    assert [p.text for p in proposal.phrases] == ["red car"]
    assert [(n.text, n.reason) for n in proposal.hard_negatives] == [("red bus", "ontology_sibling"),
                                                                     ("red truck", "ontology_sibling")]


def test_propose_step_with_the_ontology_writes_negatives(local_store):
    local_store.put("images/abc", png())
    handle = make_handler(ConceptsCore("ontology", local_store), local_store)
    outcome = run_step(handle, StepRequest("item-9", "propose", {"image_key": "images/abc",
                                                                 "known_labels": ["Cats", "red car"]}))
    assert outcome.ok, outcome.reason
    stored = Proposal.from_bytes(local_store.get(step_key("item-9", "propose")))
    assert [p.text for p in stored.phrases] == ["cat", "red car"]
    assert outcome.outputs["hard_negatives"] == len(stored.hard_negatives) == 20
    assert {"lion", "red bus", "blue car"} <= {n.text for n in stored.hard_negatives}


class PixelBackend:
    name = "pixels"
    needs_pixels = True

    def propose(self, pixels, known_labels, max_positives, max_negatives) -> Proposal:
        return Proposal()


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAENGINE_STORE_ROOT", str(tmp_path / "store"))
    monkeypatch.setitem(concepts_core.BACKENDS, "pixels", lambda settings: PixelBackend())
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, as in services.app.cli, not a lone command
    commands.register(app)
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


def test_concepts_command_prints_the_proposal_as_json(cli, tmp_path):
    result = cli("concepts", tmp_path / "a.png", "--label", "Yellow Taxis", "--labels", "dog",
                 "--backend", "ontology", "--max-negatives", "3")
    assert result.exit_code == 0, result.output
    proposal = Proposal.from_json(json.loads(result.stdout))
    assert [p.text for p in proposal.phrases] == ["yellow taxi", "dog"]
    assert [n.text for n in proposal.hard_negatives] == ["police car", "wolf", "yellow sports car"]
    listed = cli("concepts", tmp_path / "a.png", "--labels", "Yellow Taxis", "dog", "--max-negatives", "3")
    assert listed.exit_code == 0 and json.loads(listed.stdout) == json.loads(result.stdout)  # as the issue writes it


# arguments (after the image) -> (image file, exit code, phrase in the output)
BAD_COMMANDS = {
    "missing image": (("--backend", "ontology"), "none.png", 2, "none.png does not exist"),
    "unknown backend": (("--backend", "gpt-9"), "a.png", 2, "unknown concepts backend 'gpt-9'"),
    "unreadable image": (("--backend", "pixels"), "broken.png", 2, "broken.png"),
    "unreadable image, ontology": (("--backend", "ontology", "--label", "dog"), "broken.png", 2, "broken.png"),
    "label naming nothing": (("--backend", "ontology", "--label", "the"), "a.png", 2, "names nothing"),
    "negative cap": (("--max-negatives", "-1"), "a.png", 2, "--max-negatives"),
}


def test_concepts_command_without_labels_says_why_the_ontology_proposes_nothing(cli, tmp_path):
    result = cli("concepts", tmp_path / "a.png", "--backend", "ontology")
    assert result.exit_code == 0 and json.loads(result.stdout) == {"phrases": [], "hard_negatives": []}
    assert "no --label given; the ontology backend proposes only from known labels" in result.stderr


def test_concepts_command_exits_1_when_the_model_answers_no_proposal(cli, tmp_path, tiny_mllm_dir, monkeypatch):
    monkeypatch.setenv("DATAENGINE_CONCEPTS_MODEL_DIR", str(tiny_mllm_dir))
    monkeypatch.setenv("DATAENGINE_MLLM_MAX_NEW_TOKENS", "16")
    result = cli("concepts", tmp_path / "a.png", "--backend", "transformers")
    assert result.exit_code == 1  # the backend failed, not the caller
    assert "modeloutputoftransformers:" in "".join(result.output.split()), result.output  # the console wraps


@pytest.mark.parametrize("case", sorted(BAD_COMMANDS))
def test_concepts_command_bad_input_fails_clearly(cli, tmp_path, case):
    args, image, code, phrase = BAD_COMMANDS[case]
    result = cli("concepts", tmp_path / image, *args)
    assert result.exit_code == code
    # the console wraps long lines, even inside a path: compare without whitespace
    assert "".join(phrase.split()) in "".join(result.output.split()), result.output
