"""The concepts model backends: parsing a model's answer into a Proposal, the openai backend
against a loopback OpenAI-compatible server (the client itself: tests/common/test_mllm_endpoint.py),
and the local path with a tiny random Qwen2.5-VL loaded through from_pretrained."""

from __future__ import annotations

import json
import math
import re
import shutil

import grpc
import numpy as np
import pytest
import torch

from services.common.concepts import Proposal
from services.common.errors import FailedPrecondition, InvalidInput, TransientError
from services.common.mllm import ModelOutputError
from services.common.mllm.endpoint import EndpointClient
from services.common.mllm.local import LocalModel
from services.common.pb import common_pb2, concepts_pb2, concepts_pb2_grpc
from services.common.settings import Settings
from services.concepts.core import ConceptsCore, make_backend
from services.concepts.model_backends import (MAX_ANSWER_CHARS, MAX_ITEMS, OpenAIConcepts, TransformersConcepts,
                                              parse_proposal)
from services.concepts.servicer import add_to_server
from tests.common.image_cases import png, rgb_array
from tests.openai_stub import Reply
from tests.servers import grpc_loopback

H, W = 40, 60  # the test image: 0-1000 coordinates scale by 0.06 in x and 0.04 in y
SRC = "test:model"

GOOD = {"phrases": [{"text": "yellow taxi", "box": [100, 250, 500, 750], "point": None, "score": 0.9},
                    {"text": "road", "box": None, "point": [500, 900], "score": 0.7}],
        "hard_negatives": [{"text": "yellow school bus", "reason": "model", "score": 0.8}]}


def answer(phrases=None, negatives=None) -> str:
    return json.dumps({"phrases": GOOD["phrases"] if phrases is None else phrases,
                       "hard_negatives": GOOD["hard_negatives"] if negatives is None else negatives})


@pytest.fixture
def pixels() -> np.ndarray:
    return rgb_array(H, W, seed=3)


def where(phrase) -> tuple:
    """(box, point) of a phrase's only instance; (None, None) without one."""
    assert len(phrase.instances) <= 1, phrase
    return (phrase.instances[0].box, phrase.instances[0].point) if phrase.instances else (None, None)


def client(stub, timeout_s: float = 10.0, max_retries: int = 0) -> EndpointClient:
    return EndpointClient(stub.url, "stub-model", "sk-test", timeout_s, max_retries)


# ---------------------------------------------------------------- parse_proposal

def test_a_good_answer_becomes_a_proposal_in_original_pixels():
    p = parse_proposal(answer(), (H, W), SRC)
    taxi, road = p.phrases
    assert (taxi.text, taxi.score, taxi.source) == ("yellow taxi", 0.9, SRC)
    assert where(taxi)[0] == pytest.approx((6.0, 10.0, 30.0, 30.0)) and where(taxi)[1] is None
    assert where(road)[0] is None and where(road)[1] == pytest.approx((30.0, 36.0))
    assert taxi.instances[0].score == 0.9 and taxi.instances[0].source == SRC
    [bus] = p.hard_negatives
    assert (bus.text, bus.reason, bus.score, bus.source) == ("yellow school bus", "model", 0.8, SRC)


@pytest.mark.parametrize("wrapped", [
    "```json\n{}\n```",                                    # a markdown fence
    "```JSON {} ```",                                      # a fence, label upper case, one line
    "Here is the JSON you asked for:\n{}\nHope it helps!",  # prose around the object
    'Format: {{"a": 1}}. Answer: {}',                      # an earlier object without "phrases"
    "```\n{}",                                             # a fence never closed (cut-off answer)
])
def test_the_object_is_found_inside_fences_and_prose(wrapped):
    p = parse_proposal(wrapped.format(answer()), (H, W), SRC)
    assert [x.text for x in p.phrases] == ["yellow taxi", "road"]


@pytest.mark.parametrize("box, point, want_box, want_point", [
    ([-100, -50, 1200, 500], None, (0.0, 0.0, 60.0, 20.0), None),    # clipped to the image
    ([500, 750, 100, 250], None, (6.0, 10.0, 30.0, 30.0), None),     # swapped corners sorted
    ([100, 100, 100, 500], None, None, None),                        # zero width: dropped
    ([100, 1100, 500, 1200], None, None, None),                      # below the image: nothing left
    ([100, 100, 110, 500], None, None, None),                        # 0.6 px wide: under a pixel
    (None, [1000, 1000], None, (60.0, 40.0)),                        # the bottom-right corner
    (None, [1200, 10], None, None),                                  # a point outside: dropped
])
def test_geometry_is_scaled_clipped_or_dropped_keeping_the_phrase(box, point, want_box, want_point):
    [dog] = parse_proposal(answer([{"text": "dog", "box": box, "point": point}], []), (H, W), SRC).phrases
    assert dog.text == "dog"
    if want_box is None and want_point is None:
        assert dog.instances == () and not dog.grounded  # an image-level label
        return
    box, point = where(dog)
    assert box == (pytest.approx(want_box) if want_box else None)
    assert point == (pytest.approx(want_point) if want_point else None)


def test_every_instance_of_a_phrase_is_kept_and_repeats_merge():
    """Three dogs are three instances; a phrase given twice is one phrase with both's instances,
    a duplicate box (IoU >= 0.7) counted once at its higher score; old and new shapes mix."""
    phrases = [{"text": "dog", "score": 0.9, "instances": [
                   {"box": [0, 0, 100, 100], "score": 0.9}, {"box": [200, 0, 300, 100], "score": 0.8},
                   {"point": [500, 500], "score": 0.7}, {"box": [2000, 2000, 3000, 3000]}]},  # the last: off the image
               {"text": "Dog", "box": [5, 0, 100, 100], "score": 0.95},  # the first box again
               {"text": "dog", "score": 0.6, "instances": [{"box": [600, 0, 700, 100], "score": 0.6}]}]
    [dog] = parse_proposal(answer(phrases, []), (H, W), SRC).phrases
    assert dog.text == "dog" and dog.score == 0.95
    boxes = [(i.box and tuple(round(v, 2) for v in i.box), i.point, i.score) for i in dog.instances]
    assert boxes == [((0.3, 0.0, 6.0, 4.0), None, 0.95), ((12.0, 0.0, 18.0, 4.0), None, 0.8),
                     (None, (30.0, 20.0), 0.7), ((36.0, 0.0, 42.0, 4.0), None, 0.6)]


def test_bad_instances_are_model_output_errors_naming_the_field():
    for phrases, message in [([{"text": "dog", "instances": {"box": [0, 0, 1, 1]}}], "phrases[0] instances must be a list"),
                             ([{"text": "dog", "instances": ["here"]}], "phrases[0] instances[0] must be an object"),
                             ([{"text": "dog", "instances": [{"box": [0, 0, 1]}]}], "phrases[0] instances[0] box"),
                             ([{"text": "dog", "instances": [{"box": [0, 0, 500, 500], "score": float("nan")}]}],
                              "phrases[0] instances[0] score")]:
        with pytest.raises(ModelOutputError, match=re.escape(message)):
            parse_proposal(json.dumps({"phrases": phrases}), (H, W), SRC)


@pytest.mark.parametrize("phrases, negatives, want_phrases, want_negatives", [
    # a repeat (case-insensitive) merges into the first, its spelling kept
    ([{"text": "Dog"}, {"text": "dog"}], [], ["Dog"], []),
    # a negative that is also a positive is dropped
    ([{"text": "dog"}], [{"text": "DOG"}, {"text": "wolf"}], ["dog"], ["wolf"]),
    # bare strings are phrases; whitespace inside collapses
    (["cat", "  red \n car "], ["tiger"], ["cat", "red car"], ["tiger"]),
])
def test_lenient_where_the_meaning_is_clear(phrases, negatives, want_phrases, want_negatives):
    p = parse_proposal(answer(phrases, negatives), (H, W), SRC)
    assert [x.text for x in p.phrases] == want_phrases
    assert [x.text for x in p.hard_negatives] == want_negatives


def test_defaults_a_missing_score_ignores_the_models_reason_and_allows_no_negatives():
    p = parse_proposal('{"phrases": [{"text": "dog"}], "hard_negatives": [{"text": "wolf", "reason": "looks alike"}]}',
                       (H, W), SRC)
    assert p.phrases[0].score == 1.0 and p.hard_negatives[0].reason == "model"
    assert parse_proposal('{"phrases": []}', (H, W), SRC).hard_negatives == []


@pytest.mark.parametrize("text, message", [
    ("I can see a dog and a cat.", 'no complete JSON object with "phrases" in it'),
    ('{"phrases": "dog"}', '"phrases" must be a list, got str'),
    ('{"objects": ["dog"]}', 'no complete JSON object with "phrases" in it; the first object has keys [\'objects\']'),
    ('{"phrases": ["dog"], "hard_negatives": {"text": "cat"}}', '"hard_negatives" must be a list'),
    ('{"phrases": [5]}', 'phrases[0] must be an object with "text"'),
    ('{"phrases": [{"name": "dog"}]}', 'phrases[0] needs a non-empty "text"'),
    ('{"phrases": [{"text": "  "}]}', 'phrases[0] needs a non-empty "text"'),
    ('{"phrases": [{"text": "dog", "score": 1.5}]}', "score must be in [0, 1], got 1.5"),
    ('{"phrases": [{"text": "dog", "score": "high"}]}', "phrases[0] score must be a finite number"),
    ('{"phrases": [{"text": "dog", "score": NaN}]}', "phrases[0] score must be a finite number"),
    ('{"phrases": [{"text": "dog", "box": [1, 2, 3]}]}', "phrases[0] box must be 4 numbers or null"),
    ('{"phrases": [{"text": "dog", "box": ["1", 2, 3, 4]}]}', "phrases[0] box[0] must be a finite number"),
    ('{"phrases": [{"text": "dog", "point": [true, 2]}]}', "phrases[0] point[0] must be a finite number"),
    ('{"phrases": [{"text": "dog"}], "hard_negatives": [{"text": "cat", "score": -1}]}', "score must be in [0, 1]"),
    ('{"phrases": ["' + "very " * 40 + 'long"]}', "phrases[0] text is 204 characters, over 120"),
    ('{"phrases": ' + "[" * 100_000, "no complete JSON object with \"phrases\" in its first 65536"),  # nesting bomb
])
def test_malformed_answers_are_model_output_errors_saying_what(text, message):
    with pytest.raises(ModelOutputError) as info:
        parse_proposal(text, (H, W), SRC)
    assert isinstance(info.value, InvalidInput)
    assert str(info.value).startswith(f"model output of {SRC} is not a proposal: ")
    assert message in str(info.value)


def test_only_the_first_64_kib_are_parsed_and_lists_are_capped():
    # 1 MiB of phrases: the cut-off object is incomplete
    huge = answer([{"text": f"thing {i}"} for i in range(40_000)], [])
    with pytest.raises(ModelOutputError, match=f"in its first {MAX_ANSWER_CHARS} characters \\(of {len(huge)}\\); "
                                               f"the first object has keys \\['text'\\]"):
        parse_proposal(huge, (H, W), SRC)
    # a long list that fits: read up to MAX_ITEMS items
    many = answer([f"t{i}" for i in range(2000)], [f"n{i}" for i in range(2000)])
    assert len(many) < MAX_ANSWER_CHARS
    p = parse_proposal(many, (H, W), SRC)
    assert len(p.phrases) == len(p.hard_negatives) == MAX_ITEMS


# ---------------------------------------------------------------- the openai backend

def openai_backend(stub, **kw) -> OpenAIConcepts:
    return OpenAIConcepts(client(stub, kw.pop("timeout_s", 10.0)), max_new_tokens=300, **kw)


def test_openai_backend_proposes_from_a_good_answer(openai_stub, pixels):
    openai_stub.push(Reply(answer()))
    p = openai_backend(openai_stub).propose(pixels, ["taxi", "café"], 5, 3)
    assert [x.text for x in p.phrases] == ["yellow taxi", "road"] and p.phrases[0].source == "openai:stub-model"
    assert where(p.phrases[0])[0] == pytest.approx((6.0, 10.0, 30.0, 30.0))
    [seen] = openai_stub.seen
    assert '["taxi", "café"]' in seen.prompt and "at most 5 short noun phrases" in seen.prompt
    assert "at most 3 noun phrases for things that are NOT" in seen.prompt and seen.body["max_tokens"] == 300


def test_the_requests_caps_cut_the_proposal(openai_stub, pixels):
    openai_stub.push(Reply(answer([f"p{i}" for i in range(10)], [f"n{i}" for i in range(10)])))
    p = openai_backend(openai_stub, max_positives=20, max_negatives=20).propose(pixels, [], 4, 2)
    assert [x.text for x in p.phrases] == ["p0", "p1", "p2", "p3"]
    assert [x.text for x in p.hard_negatives] == ["n0", "n1"]
    assert "Known labels for this image (they may be incomplete, or empty): none" in openai_stub.seen[0].prompt


def test_a_malformed_answer_is_repaired_once(openai_stub, pixels):
    openai_stub.push(Reply("Sure! I see a yellow taxi on a road."), Reply(f"```json\n{answer()}\n```"))
    p = openai_backend(openai_stub).propose(pixels, [], 0, 0)
    assert [x.text for x in p.phrases] == ["yellow taxi", "road"]
    first, repair = openai_stub.seen
    assert repair.prompt.startswith(first.prompt)  # the request again, then what went wrong
    assert "could not be used: model output of openai:stub-model is not a proposal: no complete JSON" in repair.prompt
    assert "Sure! I see a yellow taxi on a road." in repair.prompt
    assert repair.image_url == first.image_url


@pytest.mark.parametrize("bad, message", [
    ("still not JSON, sorry", "model output of openai:stub-model is not a proposal: no complete JSON object with"),
    ("", "model output of endpoint .* is empty"),
    ('{"phrases": [{"text": "dog", "score": 7}]}', "score must be in \\[0, 1\\], got 7.0"),
])
def test_malformed_twice_fails_clearly_after_exactly_one_repair(openai_stub, pixels, bad, message):
    openai_stub.push(Reply(bad), Reply(bad), Reply(answer()))  # a third reply that must never be asked for
    with pytest.raises(InvalidInput, match=message) as info:
        openai_backend(openai_stub).propose(pixels, [], 0, 0)
    assert f"after one repair attempt; the answer, {len(bad)} characters, began {bad[:200]!r}" in str(info.value)
    assert len(openai_stub.seen) == 2


def test_a_huge_answer_is_cut_and_fails_with_a_short_message(openai_stub, pixels):
    huge = answer([{"text": f"thing {i}", "score": 0.5} for i in range(40_000)], [])  # ~1.1 MB
    openai_stub.push(Reply(huge), Reply(huge))
    with pytest.raises(InvalidInput, match=f"no complete JSON object with .phrases. in its first {MAX_ANSWER_CHARS} ") \
            as info:
        openai_backend(openai_stub).propose(pixels, [], 0, 0)
    assert len(str(info.value)) < 1000  # quotes the start of the answer, not all of it
    first, repair = openai_stub.seen
    assert len(repair.prompt) < len(first.prompt) + 3000  # the repair shows only the answer's start


def test_timeouts_and_refusals_are_not_repaired(openai_stub, pixels):
    openai_stub.push(Reply(answer(), delay_s=30))
    with pytest.raises(TransientError, match="no answer within 0.2 s"):
        openai_backend(openai_stub, timeout_s=0.2).propose(pixels, [], 0, 0)
    openai_stub.push(Reply(status=404, error="The model `stub-model` does not exist"))
    with pytest.raises(FailedPrecondition, match="does not exist"):
        openai_backend(openai_stub).propose(pixels, [], 0, 0)
    assert len(openai_stub.seen) == 2  # one request each


@pytest.mark.parametrize("settings, missing", [
    ({}, "needs DATAENGINE_CONCEPTS_ENDPOINT and DATAENGINE_CONCEPTS_MODEL"),
    ({"concepts_endpoint": "http://vllm:8000/v1"}, "needs DATAENGINE_CONCEPTS_MODEL$"),
    ({"concepts_model": "qwen"}, "needs DATAENGINE_CONCEPTS_ENDPOINT$"),
])
def test_openai_from_settings_names_the_missing_variables(settings, missing):
    with pytest.raises(FailedPrecondition, match=missing):
        make_backend("openai", Settings(**settings))


def test_the_registry_builds_the_openai_backend_from_settings_and_the_core_uses_it(openai_stub):
    settings = Settings(concepts_endpoint=openai_stub.url, concepts_model="stub-model", mllm_max_new_tokens=99,
                        mllm_timeout_s=10.0)
    core = ConceptsCore("openai", settings=settings)
    assert (core.backend.name, core.backend.needs_pixels) == ("openai", True)
    openai_stub.push(Reply(answer()))
    p = core.propose(png(H, W), ["taxi"])
    assert "yellow taxi" in [x.text for x in p.phrases]
    assert openai_stub.seen[0].body["max_tokens"] == 99


# ---------------------------------------------------------------- the transformers backend

class CountingModel:
    """A LocalModel's generate, with every prompt it was given recorded."""

    def __init__(self, model: LocalModel) -> None:
        self.model, self.prompts = model, []

    def generate(self, pixels, prompt, max_new_tokens):
        self.prompts.append(prompt)
        return self.model.generate(pixels, prompt, max_new_tokens)


def test_the_tiny_model_loads_through_from_pretrained_and_generates_greedily(tiny_mllm, pixels):
    assert type(tiny_mllm.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(tiny_mllm.processor).__name__ == "Qwen2_5_VLProcessor"
    assert sum(p.numel() for p in tiny_mllm.model.parameters()) < 5_000_000
    text = tiny_mllm.generate(pixels, "List the objects.", 12)
    assert isinstance(text, str) and text.strip()
    assert tiny_mllm.generate(pixels, "List the objects.", 12) == text  # greedy: the same answer again


def test_generation_past_the_time_limit_is_transient(tiny_mllm, pixels):
    with pytest.raises(TransientError, match=r"local model .*: generation passed the time limit of 1e-09 s"):
        tiny_mllm.generate(pixels, "List the objects.", 50, timeout_s=1e-9)


def test_an_image_the_processor_refuses_is_invalid_input(tiny_mllm):
    with pytest.raises(InvalidInput, match=r"cannot take this image \(600x2\)"):
        tiny_mllm.generate(rgb_array(2, 600), "p", 4)  # aspect ratio 300, over Qwen's limit of 200


def test_choice_logits_sum_the_bare_and_the_spaced_token_of_each_choice(tiny_mllm, pixels):
    choices = ["A", "B", "yes"]
    scores = tiny_mllm.choice_logits(pixels, "A or B?", choices)
    assert list(scores) == choices and all(math.isfinite(v) for v in scores.values())
    # the same numbers from a plain forward pass over the whole sequence, by the tokens' ids
    inputs = tiny_mllm._inputs(pixels, "A or B?")
    with torch.inference_mode():
        last = tiny_mllm.model(**inputs).logits[0, -1]
    vocab = tiny_mllm.processor.tokenizer.get_vocab()
    # byte-level BPE writes a space as "Ġ"; this tiny vocabulary has "ĠB" but spells " A" as "Ġ" + "A"
    ids = {"A": [vocab["A"]], "B": [vocab["B"], vocab["\u0120B"]]}
    for choice, tokens in ids.items():
        assert scores[choice] == pytest.approx(float(torch.logsumexp(last[tokens], dim=0)), abs=1e-5)


def test_choices_that_start_with_the_same_token_are_invalid(tiny_mllm, pixels):
    with pytest.raises(InvalidInput, match="both start with token .* cannot tell them apart"):
        tiny_mllm.choice_logits(pixels, "p", ["B", " B"])  # " B" is the spaced spelling of "B"


def test_garbage_from_the_model_fails_clearly_after_exactly_one_repair(tiny_mllm, pixels):
    counting = CountingModel(tiny_mllm)
    backend = TransformersConcepts(counting, "transformers:tiny", max_new_tokens=24)
    with pytest.raises(InvalidInput, match=r"^model output of transformers:tiny is not a proposal: .* "
                                           r"\(after one repair attempt; the answer, \d+ characters, began '"):
        backend.propose(pixels, ["dog"], 0, 0)
    assert len(counting.prompts) == 2
    assert counting.prompts[1].startswith(counting.prompts[0]) and "could not be used" in counting.prompts[1]


def test_transformers_from_settings_loads_the_directory(tiny_mllm_dir, pixels):
    with pytest.raises(FailedPrecondition, match="needs DATAENGINE_CONCEPTS_MODEL_DIR"):
        make_backend("transformers", Settings())
    backend = make_backend("transformers", Settings(concepts_model_dir=tiny_mllm_dir, mllm_max_new_tokens=8))
    assert (backend.name, backend.needs_pixels, backend.source) == ("transformers", True,
                                                                    f"transformers:{tiny_mllm_dir.name}")
    with pytest.raises(InvalidInput, match="after one repair attempt"):
        backend.propose(pixels, [], 0, 0)


def test_a_missing_or_incomplete_model_directory_is_a_failed_precondition(tmp_path, tiny_mllm_dir):
    with pytest.raises(FailedPrecondition, match=f"model directory {tmp_path / 'nope'} does not exist"):
        LocalModel.load(tmp_path / "nope")
    with pytest.raises(FailedPrecondition, match=f"model directory {tmp_path} has no config.json"):
        LocalModel.load(tmp_path)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_mllm_dir / "config.json", partial)  # no weights, no processor files
    with pytest.raises(FailedPrecondition, match=f"cannot load the model in {partial}: "):
        LocalModel.load(partial)


# ---------------------------------------------------------------- through gRPC

def test_model_backends_over_grpc(openai_stub, tiny_mllm_dir, local_store):
    """Propose over loopback gRPC: the endpoint's good answer becomes the reply; the tiny random
    model's unusable answer, and a slow endpoint, become statuses naming the problem."""
    settings = Settings(concepts_backend="openai", concepts_endpoint=openai_stub.url, concepts_model="stub-model",
                        concepts_model_dir=tiny_mllm_dir, mllm_max_retries=0, mllm_timeout_s=0.5,
                        mllm_max_new_tokens=16)
    core = ConceptsCore.from_settings(settings, local_store)
    request = concepts_pb2.ProposeRequest(image=common_pb2.ImageRef(data=png(H, W)), known_labels=["taxis"])
    with grpc_loopback(lambda s: add_to_server(s, core), 4 << 20) as (channel, _):
        stub = concepts_pb2_grpc.ConceptsStub(channel)
        openai_stub.push(Reply(answer()))
        proposal = Proposal.from_proto(stub.Propose(request, timeout=30))
        assert [p.text for p in proposal.phrases] == ["yellow taxi", "road"]
        assert where(proposal.phrases[0])[0] == pytest.approx((6.0, 10.0, 30.0, 30.0))  # 0-1000 -> pixels
        assert [(n.text, n.source) for n in proposal.hard_negatives] == [("yellow school bus", "openai:stub-model")]
        assert '"taxi"' in openai_stub.seen[0].prompt  # the known label, cleaned
        openai_stub.push(Reply(answer(), delay_s=5.0))
        with pytest.raises(grpc.RpcError) as slow:
            stub.Propose(request, timeout=30)
        assert slow.value.code() == grpc.StatusCode.UNAVAILABLE and "no answer within 0.5 s" in slow.value.details()
        local = concepts_pb2.ProposeRequest(image=request.image, backend="transformers")
        with pytest.raises(grpc.RpcError) as garbage:
            stub.Propose(local, timeout=60)
    assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model output of transformers:" in garbage.value.details()
