"""The shared endpoint client (``services.common.mllm.endpoint``) with the real openai client
against a loopback OpenAI-compatible server: the image as a data URL, the client's retries and
timeouts mapped to project errors, empty answers, and the choice logprobs the verifier scores."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
from PIL import Image

from services.common.errors import FailedPrecondition, TransientError
from services.common.mllm import ModelOutputError
from services.common.mllm.endpoint import EndpointClient, missing_choice_bound
from tests.common.image_cases import rgb_array
from tests.openai_stub import Reply
from tests.servers import free_port

H, W = 40, 60


@pytest.fixture
def pixels() -> np.ndarray:
    return rgb_array(H, W, seed=3)


def client(stub, timeout_s: float = 10.0, max_retries: int = 0) -> EndpointClient:
    return EndpointClient(stub.url, "stub-model", "sk-test", timeout_s, max_retries)


def test_chat_sends_the_image_as_a_png_data_url_and_returns_the_answer(openai_stub, pixels):
    openai_stub.push(Reply("a dog"))
    assert client(openai_stub).chat(pixels, "What is here?", 7) == "a dog"
    [seen] = openai_stub.seen
    assert seen.image_url.startswith("data:image/png;base64,")
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(seen.image_url.split(",", 1)[1]))))
    assert np.array_equal(sent, pixels)  # lossless: the model sees these exact pixels
    assert seen.prompt == "What is here?"
    assert (seen.body["model"], seen.body["max_tokens"], seen.body["temperature"]) == ("stub-model", 7, 0.0)
    assert seen.headers["authorization"] == "Bearer sk-test"


def test_a_500_is_retried_by_the_client(openai_stub, pixels):
    openai_stub.push(Reply(status=500, error="overloaded"), Reply("ok"))
    assert client(openai_stub, max_retries=1).chat(pixels, "p", 5) == "ok"
    assert len(openai_stub.seen) == 2


@pytest.mark.parametrize("status", [429, 503])
def test_429_and_5xx_after_the_retries_are_transient(openai_stub, pixels, status):
    openai_stub.push(*[Reply(status=status, error="busy, try later")] * 3)
    with pytest.raises(TransientError) as info:
        client(openai_stub, max_retries=2).chat(pixels, "p", 5)
    assert f"endpoint {openai_stub.url} (model 'stub-model'): HTTP {status} after 3 attempts: busy, try later" \
        == str(info.value)
    assert len(openai_stub.seen) == 3


def test_a_400_is_a_failed_precondition_with_the_servers_message_and_no_retry(openai_stub, pixels):
    openai_stub.push(Reply(status=400, error="The model `stub-model` does not support images"))
    with pytest.raises(FailedPrecondition, match=r"refused the request \(HTTP 400\): The model `stub-model` "
                                                 r"does not support images"):
        client(openai_stub, max_retries=2).chat(pixels, "p", 5)
    assert len(openai_stub.seen) == 1


def test_an_answer_slower_than_the_timeout_is_transient_after_the_retries(openai_stub, pixels):
    openai_stub.push(Reply("late", delay_s=30), Reply("late", delay_s=30))
    with pytest.raises(TransientError, match=rf"endpoint {openai_stub.url} .*: no answer within 0.2 s, "
                                             r"after 2 attempts"):
        client(openai_stub, timeout_s=0.2, max_retries=1).chat(pixels, "p", 5)
    assert len(openai_stub.seen) == 2


def test_an_unreachable_endpoint_is_transient(pixels):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(TransientError, match=rf"endpoint {url} \(model 'm'\): cannot connect"):
        EndpointClient(url, "m", "", 2.0, 0).chat(pixels, "p", 5)


@pytest.mark.parametrize("reply, message", [
    (Reply(""), "is empty"),
    (Reply("  \n "), "is empty"),
    (Reply(None), "is empty"),                  # a message without content
    (Reply("x", choices=0), "has no choice"),   # a completion without choices
])
def test_an_empty_or_missing_answer_is_model_output_error(openai_stub, pixels, reply, message):
    openai_stub.push(reply)
    with pytest.raises(ModelOutputError, match=rf"^model output of endpoint {openai_stub.url} .*{message}"):
        client(openai_stub).chat(pixels, "p", 5)


def test_choice_logprobs_reads_the_first_tokens_alternatives(openai_stub, pixels):
    openai_stub.push(Reply("A", logprobs=[("A", -0.1), (" A", -3.0), ("B", -4.0), ("Absent", -5.0)]))
    scores = client(openai_stub).choice_logprobs(pixels, "A or B?", ["A", "B", "C"])
    assert scores["A"] == pytest.approx(math.log(math.exp(-0.1) + math.exp(-3.0)))  # "A" and " A"
    assert scores["B"] == pytest.approx(-4.0)
    assert scores["C"] == pytest.approx(-5.0)  # not listed: at most the least listed token
    body = openai_stub.seen[0].body
    assert (body["logprobs"], body["top_logprobs"], body["max_tokens"]) == (True, 20, 1)


def test_choice_logprobs_without_logprobs_is_a_failed_precondition(openai_stub, pixels):
    openai_stub.push(Reply("A"))  # a server that ignores the logprobs request
    with pytest.raises(FailedPrecondition, match="endpoint gives no logprobs"):
        client(openai_stub).choice_logprobs(pixels, "A or B?", ["A", "B"])
    openai_stub.push(Reply("A", logprobs=[("A", -0.7)], sampled_only=True))  # ... or the top_logprobs one
    with pytest.raises(FailedPrecondition, match="no top_logprobs alternatives"):
        client(openai_stub).choice_logprobs(pixels, "A or B?", ["A", "B"])


@pytest.mark.parametrize("listed, missing, bound", [
    ([-0.01, -6.0], 1, -6.0),                                # the least listed token caps it
    ([-0.01, -6.0], 4, math.log((1 - math.exp(-0.01) - math.exp(-6.0)) / 4)),  # four share what is left
    ([math.log(0.6), math.log(0.4)], 2, -math.inf),          # the list holds all the mass
])
def test_a_choice_missing_from_the_top_list_gets_the_most_it_can_have(listed, missing, bound):
    assert missing_choice_bound(listed, missing) == pytest.approx(bound)
