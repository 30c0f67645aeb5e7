"""Concepts: the Proposal containers, the offline ``labels`` backend behind ConceptsCore, the
Propose gRPC service over loopback, and the ``propose`` pipeline step on a local directory and an
S3 server; each bad input fails with a message naming the problem."""

from __future__ import annotations

import json
import math
import re

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.concepts import HardNegative, Instance, NounPhrase, Proposal
from services.common.errors import InvalidInput, NotFound
from services.common.keys import step_key
from services.common.pb import common_pb2, concepts_pb2, concepts_pb2_grpc
from services.common.settings import Settings
from services.common.steps import StepRequest, run_step
from services.concepts.core import ConceptsCore, LabelsBackend, make_backend
from services.concepts.servicer import SERVICE_NAME, add_to_server
from services.concepts.step import make_handler
from tests.common.image_cases import BAD_IMAGES, png
from tests.servers import grpc_loopback

MAX_MESSAGE = 4 << 20


class PixelBackend:
    """A backend that reads the image, to exercise the decode path (model backends come later)."""

    name = "pixels"
    needs_pixels = True

    def __init__(self) -> None:
        self.seen: list[tuple[tuple[int, ...], np.dtype]] = []  # (shape, dtype) of each image

    def propose(self, pixels, known_labels, max_positives, max_negatives) -> Proposal:
        self.seen.append((pixels.shape, pixels.dtype))
        return Proposal([NounPhrase.at("thing", 0.5, self.name, box=(0, 0, 3, 2))],
                        [HardNegative("other thing", "model", 0.25, self.name)])


def _proposal() -> Proposal:
    return Proposal(phrases=[NounPhrase.at("red car", 0.75, "test", box=(1, 2, 30, 40)),
                             NounPhrase.at("wheel", 1.0, "test", point=(5.5, 6.0)), NounPhrase("sky")],
                    hard_negatives=[HardNegative("blue car", "attribute_swap", 0.5, "test")])


# -- containers -------------------------------------------------------------------------------

def test_proposal_round_trips_through_json_bytes_and_proto():
    proposal = _proposal()
    assert Proposal.from_json(json.loads(json.dumps(proposal.to_json()))) == proposal
    assert Proposal.from_bytes(proposal.to_bytes()) == proposal
    back = Proposal.from_proto(proposal.to_proto())
    assert back.to_json() == proposal.to_json()  # these values are exact in float32
    assert [p.grounded for p in back.phrases] == [True, True, False]
    msg = proposal.to_proto()
    first, second = msg.phrases[0].instances[0], msg.phrases[1].instances[0]
    assert first.HasField("box") and not first.HasField("point") and not first.HasField("mask")
    assert list(msg.phrases[2].instances) == [] and second.point.label == 1


def test_one_box_proposals_written_before_instances_still_read():
    """The JSON and proto of proposals from before instances: a phrase's one box or point is its one instance."""
    old = {"phrases": [{"text": "car", "score": 0.5, "source": "m", "box": [1, 2, 30, 40], "point": None},
                       {"text": "wheel", "score": 1.0, "source": "m", "box": None, "point": [5.5, 6.0]},
                       {"text": "sky", "score": 1.0, "source": "m", "box": None, "point": None}],
           "hard_negatives": []}
    proposal = Proposal.from_json(old)
    car, wheel, sky = proposal.phrases
    assert car.instances == (Instance((1, 2, 30, 40), None, 0.5, source="m"),)
    assert wheel.instances == (Instance(None, (5.5, 6.0), 1.0, source="m"),) and sky.instances == ()
    msg = concepts_pb2.ProposeResponse(phrases=[common_pb2.NounPhrase(
        text="car", score=0.5, source="m", box=common_pb2.Box(x0=1, y0=2, x1=30, y1=40))])
    assert Proposal.from_proto(msg).phrases == [car]


def test_instances_with_masks_round_trip():
    mask = {"size": [4, 5], "counts": [2, 2, 16]}  # uncompressed runs (column-major): stored compressed
    phrase = NounPhrase("dog", 0.5, "sam3:dir", (Instance(mask=mask, score=0.75, source="sam3:dir"),
                                                 Instance(box=(0, 0, 2, 2), score=0.5, source="owlv2:dir")))
    assert isinstance(phrase.instances[0].mask["counts"], str)
    assert phrase.instances[0].extent() == (0.0, 2.0, 1.0, 4.0)  # rows 2-3 of column 0
    proposal = Proposal([phrase])
    assert Proposal.from_json(json.loads(json.dumps(proposal.to_json()))) == proposal
    assert Proposal.from_proto(proposal.to_proto()) == proposal  # scores exact in float32


def _good() -> dict:
    return _proposal().to_json()


# name -> (how to break a good proposal's JSON, a phrase the error must contain)
BAD_PROPOSALS = {
    "not an object": (lambda d: ["phrases"], "must be a JSON object"),
    "no phrases": (lambda d: {"hard_negatives": []}, "lacks 'phrases'"),
    "phrases not a list": (lambda d: {**d, "phrases": {"text": "a"}}, "phrases must be a list"),
    "phrase without text": (lambda d: {**d, "phrases": [{"score": 1.0}]}, "phrases[0] lacks 'text'"),
    "empty text": (lambda d: {**d, "phrases": [{"text": "  "}]}, "non-empty text"),
    "NaN score": (lambda d: {**d, "phrases": [{"text": "a", "score": math.nan}]}, "finite number"),
    "score above 1": (lambda d: {**d, "phrases": [{"text": "a", "score": 1.5}]}, "in [0, 1]"),
    "bool score": (lambda d: {**d, "phrases": [{"text": "a", "score": True}]}, "finite number"),
    "box of 3": (lambda d: {**d, "phrases": [{"text": "a", "box": [1, 2, 3]}]}, "box must be 4 numbers"),
    "instance box of 3": (lambda d: {**d, "phrases": [{"text": "a", "instances": [{"box": [1, 2, 3]}]}]},
                          "phrases[0] instances[0]: instance box must be 4 numbers"),
    "empty instance": (lambda d: {**d, "phrases": [{"text": "a", "instances": [{"score": 0.5}]}]},
                       "instances[0]: an instance needs a box, a point or a mask"),
    "instance mask garbage": (lambda d: {**d, "phrases": [{"text": "a", "instances": [
        {"mask": {"size": [4, 5], "counts": "0"}}]}]}, "instance mask: its runs cover 0 pixels, not 4x5 = 20"),
    "instances not a list": (lambda d: {**d, "phrases": [{"text": "a", "instances": {"box": [0, 0, 1, 1]}}]},
                             "instances must be a list"),
    "box reversed": (lambda d: {**d, "phrases": [{"text": "a", "box": [5, 0, 1, 1]}]}, "x0 <= x1"),
    "point with text": (lambda d: {**d, "phrases": [{"text": "a", "point": ["x", 1]}]}, "point[0]"),
    "negative without reason": (lambda d: {**d, "hard_negatives": [{"text": "b"}]},
                                "hard_negatives[0] lacks 'reason'"),
    "negatives not a list": (lambda d: {**d, "hard_negatives": "b"}, "hard_negatives must be a list"),
    # phrases are keys of later results: a repeat would overwrite another's verdicts
    "repeated phrase": (lambda d: {**d, "phrases": [{"text": "Cat"}, {"text": "cat "}]}, "repeats"),
    "positive and negative": (lambda d: {"phrases": [{"text": "cat"}],
                                         "hard_negatives": [{"text": "CAT", "reason": "model"}]}, "repeats"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROPOSALS))
def test_malformed_proposal_json_names_the_problem(case):
    breaker, phrase = BAD_PROPOSALS[case]
    with pytest.raises(InvalidInput, match=re.escape(phrase)):
        Proposal.from_json(breaker(_good()))


@pytest.mark.parametrize("data", [b"", b"{not json", b"\xff\xfe", b"[1, 2]"])
def test_unreadable_proposal_bytes_name_the_key(data):
    with pytest.raises(InvalidInput, match="items/x/propose.json"):
        Proposal.from_bytes(data, "items/x/propose.json")


# -- core -------------------------------------------------------------------------------------

@pytest.fixture
def core(local_store) -> ConceptsCore:
    return ConceptsCore("labels", local_store, max_pixels=100_000)


def test_labels_backend_proposes_the_cleaned_known_labels_in_order(core):
    proposal = core.propose(png(), ["  red car", "Wheel", "red CAR ", "wheel", "sky"])
    assert [p.text for p in proposal.phrases] == ["red car", "wheel", "sky"]  # cleaned; the first occurrence wins
    assert all(p.score == 1.0 and p.source == "labels" and not p.grounded for p in proposal.phrases)
    assert proposal.hard_negatives == []
    assert core.propose(png(), []) == Proposal()  # no labels: nothing to propose, not an error


def test_max_positives_caps_the_proposal(core):
    assert [p.text for p in core.propose(png(), ["cat", "dog", "cow"], max_positives=2).phrases] == ["cat", "dog"]


# (labels, keyword arguments) -> a phrase the error must contain
BAD_CALLS = {
    "empty label": ((["cat", ""], {}), "known label 1 is empty"),
    "blank label": ((["  "], {}), "known label 0 is empty"),
    "label not text": ((["cat", 3], {}), "not text"),
    "one string": (("cat", {}), "not one string"),
    "negative max_positives": ((["cat"], {"max_positives": -1}), "max_positives"),
    "unknown backend": ((["cat"], {"backend": "gpt-9"}), "unknown concepts backend 'gpt-9'; one of labels"),
    # the hostile-input run: a 1 MB label came back whole, NUL and ESC survived cleaning
    "1 MB label": ((["x" * (1 << 20)], {}), "known label 0 has 1048576 characters .* at most 200"),
    "NUL in a label": ((["dog\x00cat"], {}), "known label 0 'dog.x00cat' holds control characters"),
    "ESC in a label": ((["\x1b[31mdog"], {}), "control characters"),
    "too many labels": (([f"thing {i}" for i in range(257)], {}), "257 known labels; at most 256"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_calls_are_invalid_input(core, case):
    (labels, kwargs), phrase = BAD_CALLS[case]
    with pytest.raises(InvalidInput, match=phrase):
        core.propose(png(), labels, **kwargs)


def test_unknown_backend_name_is_refused_up_front():
    with pytest.raises(InvalidInput, match="unknown concepts backend 'llm'"):
        make_backend("llm")
    with pytest.raises(InvalidInput, match="unknown concepts backend"):
        ConceptsCore("llm")
    assert isinstance(make_backend("labels"), LabelsBackend)


def test_image_key_must_exist_even_when_pixels_are_not_read(core, local_store):
    local_store.put("uploads/a.png", png())
    assert core.propose("uploads/a.png", ["cat"]).phrases[0].text == "cat"
    with pytest.raises(NotFound, match="uploads/missing.png"):
        core.propose("uploads/missing.png", ["cat"])
    with pytest.raises(InvalidInput, match="'..'"):
        core.propose("../etc/passwd", ["cat"])


def test_a_pixel_backend_gets_decoded_pixels(local_store):
    backend = PixelBackend()
    core = ConceptsCore(backend, local_store, max_pixels=100_000)
    local_store.put("uploads/b.png", png(12, 20))
    core.propose("uploads/b.png", [])
    core.propose(png(7, 9), [])
    assert backend.seen == [((12, 20, 3), np.uint8), ((7, 9, 3), np.uint8)]  # HxWx3 RGB


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_a_pixel_backend_rejects_bad_images_clearly(local_store, name):
    data, phrase = BAD_IMAGES[name]
    core = ConceptsCore(PixelBackend(), local_store, max_pixels=100_000)
    with pytest.raises(InvalidInput, match=phrase):
        core.propose(data, ["cat"])


# images whose header is unreadable; a truncated body is for the backends that decode (the
# embed step decodes every image of the pipeline)
UNREADABLE = ("zero_bytes", "not_an_image", "truncated_jpeg_header", "bomb_header")


@pytest.mark.parametrize("name", UNREADABLE)
@pytest.mark.parametrize("backend", ["ontology", "labels"])
def test_backends_that_ignore_pixels_still_refuse_what_is_no_image(local_store, backend, name):
    data, phrase = BAD_IMAGES[name]
    local_store.put("uploads/bad", data)
    core = ConceptsCore(backend, local_store, max_pixels=100_000)
    with pytest.raises(InvalidInput, match=phrase):
        core.propose(data, ["cat"])
    with pytest.raises(InvalidInput, match=r"key 'uploads/bad'"):
        core.propose("uploads/bad", ["cat"])


class TellingBackend:
    """A model backend that proposes what it is told, as a model may: the known label itself
    as a negative, its plural, its parent, its synonym, its companion, and one real negative."""

    name = "telling"
    needs_pixels = False

    def propose(self, pixels, known_labels, max_positives, max_negatives) -> Proposal:
        texts = ["dogs", "animal", "puppy", "golden retriever", "keyboard", "wolf", "zorb", "fox"]
        return Proposal([NounPhrase("laptop", 0.9, self.name)], [HardNegative(t, "model", 0.5, self.name)
                                                                 for t in texts])


def test_no_backend_may_propose_what_the_image_holds_as_a_negative(local_store):
    proposal = ConceptsCore(TellingBackend(), local_store).propose(png(), ["dog"], 0, 2)
    assert [p.text for p in proposal.phrases] == ["laptop"]
    # dog, its parent, synonym and child are in the image, the laptop's keyboard too; the cap of
    # 2 counts what is left
    assert [n.text for n in proposal.hard_negatives] == ["wolf", "zorb"]


def test_core_from_settings(tmp_path):
    core = ConceptsCore.from_settings(Settings(store="local", store_root=tmp_path / "s"))
    assert core.backend.name == "ontology" and core.store is not None
    with pytest.raises(InvalidInput, match="unknown concepts backend 'nope'"):
        ConceptsCore.from_settings(Settings(store="local", store_root=tmp_path / "s", concepts_backend="nope"))


# -- gRPC -------------------------------------------------------------------------------------

@pytest.fixture
def stub(core):
    with grpc_loopback(lambda s: add_to_server(s, core), MAX_MESSAGE) as (channel, _):
        yield concepts_pb2_grpc.ConceptsStub(channel), channel


def test_propose_over_grpc(stub, local_store):
    local_store.put("uploads/a.png", png())
    client, channel = stub
    reply = client.Propose(concepts_pb2.ProposeRequest(image=common_pb2.ImageRef(key="uploads/a.png"),
                                                       known_labels=["dog", " Dog", "cat"]), timeout=10)
    assert Proposal.from_proto(reply) == Proposal([NounPhrase("dog", 1.0, "labels"), NounPhrase("cat", 1.0, "labels")])
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert health.status == health_pb2.HealthCheckResponse.SERVING


# request fields -> (status, phrase in the details)
BAD_REQUESTS = {
    "no image": ({"image": None}, grpc.StatusCode.INVALID_ARGUMENT, "has no image"),
    "image without source": ({"image": common_pb2.ImageRef(filename="x")}, grpc.StatusCode.INVALID_ARGUMENT,
                             "neither data nor key"),
    "empty label": ({"known_labels": ["cat", ""]}, grpc.StatusCode.INVALID_ARGUMENT, "known label 1 is empty"),
    "1 MB label": ({"known_labels": ["x" * (1 << 20)]}, grpc.StatusCode.INVALID_ARGUMENT, "at most 200"),
    "ESC in a label": ({"known_labels": ["\x1b[2Jdog"]}, grpc.StatusCode.INVALID_ARGUMENT, "control characters"),
    "unknown backend": ({"backend": "gpt-9"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown concepts backend"),
    "negative max_negatives": ({"max_negatives": -2}, grpc.StatusCode.INVALID_ARGUMENT, "max_negatives"),
    "missing key": ({"image": common_pb2.ImageRef(key="uploads/none.png")}, grpc.StatusCode.NOT_FOUND,
                    "uploads/none.png"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_a_status_naming_the_problem(stub, case):
    fields, code, phrase = BAD_REQUESTS[case]
    request = {"image": common_pb2.ImageRef(data=png()), "known_labels": ["cat"], **fields}
    if request["image"] is None:
        del request["image"]
    client, _ = stub
    with pytest.raises(grpc.RpcError) as err:
        client.Propose(concepts_pb2.ProposeRequest(**request), timeout=10)
    assert err.value.code() == code
    assert phrase in err.value.details()


# -- pipeline step ----------------------------------------------------------------------------

@pytest.fixture(params=["local_store", "minio_store"])
def store(request):
    return request.getfixturevalue(request.param)


def test_propose_step_writes_the_proposal_at_its_step_key(store):
    store.put("images/abc", png())
    handle = make_handler(ConceptsCore("labels", store), store)
    outcome = run_step(handle, StepRequest("item-1", "propose", {"image_key": "images/abc",
                                                                 "known_labels": ["cat", "dog", "CAT"]}))
    assert outcome.ok, outcome.reason
    key = step_key("item-1", "propose")
    assert key == "items/item-1/propose.json"
    assert outcome.outputs == {"concepts_key": key, "phrases": 2, "hard_negatives": 0}
    assert [p.text for p in Proposal.from_bytes(store.get(key)).phrases] == ["cat", "dog"]
    # re-running overwrites the same key
    again = run_step(handle, StepRequest("item-1", "propose", {"image_key": "images/abc", "known_labels": []}))
    assert again.outputs["phrases"] == 0 and Proposal.from_bytes(store.get(key)) == Proposal()


# inputs -> (code, phrase in the reason)
BAD_STEPS = {
    "no image_key": ({"known_labels": ["cat"]}, "INVALID_ARGUMENT", "needs input 'image_key'"),
    "labels not a list": ({"image_key": "images/abc", "known_labels": "cat"}, "INVALID_ARGUMENT",
                          "known_labels as a list"),
    "empty label": ({"image_key": "images/abc", "known_labels": [""]}, "INVALID_ARGUMENT", "empty"),
    "missing image": ({"image_key": "images/nope", "known_labels": []}, "NOT_FOUND", "images/nope"),
}


@pytest.mark.parametrize("case", sorted(BAD_STEPS))
def test_bad_step_inputs_fail_the_item_with_a_reason(local_store, case):
    inputs, code, phrase = BAD_STEPS[case]
    local_store.put("images/abc", png())
    outcome = run_step(make_handler(ConceptsCore("labels", local_store), local_store),
                       StepRequest("item-2", "propose", inputs))
    assert not outcome.ok and outcome.code == code and phrase in outcome.reason
    assert not local_store.exists(step_key("item-2", "propose"))

