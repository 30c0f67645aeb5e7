"""Multimodal verifier backends: what the model is shown, how choice scores become verdicts and
pair and item scores, and the two real paths (a loopback OpenAI-compatible endpoint, a tiny local
model loaded with from_pretrained)."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest

from services.common.errors import FailedPrecondition, InvalidInput, TransientError
from services.common.masks import MaskRecord, encode_rle
from services.common.pb import common_pb2, verifier_pb2, verifier_pb2_grpc
from services.common.settings import Settings
from services.verifier.core import PhrasePair, VerifierCore, make_backend
from services.verifier.model_backends import CHOICES, ModelVerifier, openai_verifier, softmax, transformers_verifier
from services.verifier.render import PANEL, composite, crop_box, mask_array
from services.verifier.servicer import add_to_server
from tests.common.image_cases import png
from tests.openai_stub import Reply
from tests.servers import grpc_loopback

H, W = 40, 60


def record(mask: np.ndarray) -> MaskRecord:
    ys, xs = np.nonzero(mask)
    bbox = [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)] if len(xs) else [0.0] * 4
    return MaskRecord(segmentation=encode_rle(mask), bbox=bbox, area=int(mask.sum()), predicted_iou=0.9,
                      stability_score=0.95, point_coords=[[0.0, 0.0]], crop_box=[0, 0, W, H])


def box(y0, y1, x0, x1, size=(H, W)) -> np.ndarray:
    m = np.zeros(size, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)


class Scripted:
    """A ChoiceModel answering from a table: (check, phrase) -> letter scores. It records what it saw."""

    def __init__(self, table: dict[tuple[str, str], dict[str, float]]) -> None:
        self.table, self.seen = table, []

    def choice_scores(self, pixels, prompt, letters):
        self.seen.append((pixels.shape, prompt, letters))
        check = next(c for c in CHOICES if CHOICES[c][0][1] in letters and len(CHOICES[c]) == len(letters))
        phrase = prompt.split('Noun phrase: "')[1].split('"')[0]
        return self.table[(check, phrase)]


def test_composite_shows_the_overlay_and_a_crop_at_panel_height(pixels):
    mask = box(10, 20, 30, 50)
    picture = composite(pixels, [mask])
    assert picture.shape[0] == PANEL and picture.dtype == np.uint8
    assert crop_box([mask], (H, W)) == (25, 6, 55, 24)  # the box plus a margin, clipped
    assert crop_box([], (H, W)) == (0, 0, W, H)
    left = picture[:, :round(W * PANEL / H)]
    assert (left[:, :, 0].astype(int) - left[:, :, 1]).mean() > (pixels[:, :, 0].astype(int) - pixels[:, :, 1]).mean()


def test_a_mask_of_another_image_size_is_invalid_input():
    with pytest.raises(InvalidInput, match=r"mask 0 is 20x20 but the image is 40x60"):
        mask_array(record(box(0, 5, 0, 5, size=(20, 20))), (H, W), "mask 0")


def test_softmax_over_choice_letters():
    assert softmax({"A": 0.0, "B": 0.0}, ["A", "B"], "m") == [0.5, 0.5]
    assert softmax({"A": -1.0}, ["A", "B"], "m") == [1.0, 0.0]  # a letter missing from the answer: 0
    with pytest.raises(InvalidInput, match="none of the choices"):
        softmax({"Z": 1.0}, ["A", "B"], "m")
    with pytest.raises(InvalidInput, match="NaN"):
        softmax({"A": math.nan, "B": 0.0}, ["A", "B"], "m")


def test_verdicts_pair_scores_and_item_score_follow_the_documented_rule(pixels):
    log = math.log
    model = Scripted({
        ("mask", "dog"): {"A": log(0.8), "E": log(0.2)},            # P(accept) 0.8 per mask
        ("exhaustivity", "dog"): {"A": log(0.6), "B": log(0.4)},    # 0.6: one dog may be missing
        ("hard_negative", "cat"): {"A": log(0.9), "B": log(0.1)},   # a negative: P(absent) 0.9
        ("hard_negative", "sky"): {"A": log(0.3), "B": log(0.7)},   # a label: P(present) 0.7
    })
    verifier = ModelVerifier(model, "scripted", "scripted:v1")
    dog = [record(box(0, 10, 0, 10)), record(box(20, 30, 20, 40))]
    result = verifier.verify(pixels, [PhrasePair("dog", dog), PhrasePair("cat", [], True), PhrasePair("sky")],
                             [], frozenset(CHOICES))
    by = {p.phrase: p for p in result.pairs}
    assert [v.check for v in by["dog"].verdicts] == ["mask", "mask", "exhaustivity"]
    assert [v.mask_indices for v in by["dog"].verdicts] == [[0], [1], [0, 1]]
    assert by["dog"].score == pytest.approx(min(0.8, 0.6))
    assert by["cat"].score == pytest.approx(0.9) and by["cat"].verdicts[0].choice == "absent"
    assert by["sky"].score == pytest.approx(0.7) and by["sky"].verdicts[0].choice == "present"
    assert result.score == pytest.approx(0.6)  # the weakest pair
    assert all(shape[0] == PANEL for shape, _, _ in model.seen)
    assert '"dog" (2 masks)' in next(p for _, p, letters in model.seen if len(letters) == 6)


def test_checks_choose_the_questions(pixels):
    model = Scripted({("mask", "dog"): {"A": 0.0, "E": 0.0}})
    result = ModelVerifier(model, "s", "s").verify(pixels, [PhrasePair("dog", [record(box(0, 5, 0, 5))]),
                                                            PhrasePair("cat", [], True)], [], frozenset({"mask"}))
    assert [p.phrase for p in result.pairs] == ["dog"] and len(model.seen) == 1
    assert result.pairs[0].score == pytest.approx(0.5)


def test_the_model_backends_name_their_missing_settings():
    with pytest.raises(FailedPrecondition, match="DATAENGINE_VERIFIER_ENDPOINT"):
        openai_verifier(Settings())
    with pytest.raises(FailedPrecondition, match="DATAENGINE_VERIFIER_MODEL_DIR"):
        transformers_verifier(Settings())


@pytest.mark.parametrize("backend", ["openai", "transformers"])
def test_a_calibration_under_a_model_backend_is_refused_not_ignored(tmp_path, backend):
    settings = Settings(verifier_backend=backend, verifier_endpoint="http://127.0.0.1:1/v1", verifier_model="m",
                        verifier_model_dir=tmp_path, verifier_calibration=tmp_path / "calibration.json")
    with pytest.raises(FailedPrecondition, match=f"calibrates the heuristic verifier only; the {backend} backend"):
        make_backend(backend, settings)


# -- the openai path, against a loopback OpenAI-compatible endpoint -----------------------------

def _endpoint_settings(stub, **kw) -> Settings:
    return Settings(verifier_backend="openai", verifier_endpoint=stub.url, verifier_model="judge",
                    **{"mllm_max_retries": 0, **kw})


def _letters(**probs: float) -> list[tuple[str, float]]:
    """First-token alternatives as an endpoint sends them: " A" and "A" both count for "A"."""
    return [(f" {letter}" if i % 2 else letter, math.log(p)) for i, (letter, p) in enumerate(probs.items())]


def test_openai_scores_are_the_softmax_of_the_choice_logprobs(openai_stub, pixels):
    openai_stub.push(Reply(logprobs=_letters(A=0.6, E=0.3, Z=0.1)),       # mask: P(accept) 0.6 / 0.9
                     Reply(logprobs=_letters(A=0.2, B=0.7)),               # exhaustivity: C-F share 0.1
                     Reply(logprobs=_letters(A=0.45, B=0.45, Q=0.1)))      # hard negative: P(absent) 0.5
    verifier = openai_verifier(_endpoint_settings(openai_stub))
    result = verifier.verify(pixels, [PhrasePair("dog", [record(box(5, 15, 5, 25))]), PhrasePair("cat", [], True)],
                             [], frozenset(CHOICES))
    dog, cat = result.pairs
    assert [(v.check, v.choice) for v in dog.verdicts] == [("mask", "accept"), ("exhaustivity", "reject")]
    assert [v.score for v in dog.verdicts] == pytest.approx([0.6 / 0.9, 0.2])
    assert dog.score == pytest.approx(0.2) and cat.score == pytest.approx(0.5)
    assert result.score == pytest.approx(0.2)
    assert {v.source for v in dog.verdicts} == {"openai:judge"}
    first = openai_stub.seen[0]
    assert first.body["model"] == "judge" and first.body["logprobs"] is True and first.body["max_tokens"] == 1
    assert first.image_url.startswith("data:image/png;base64,") and '"dog"' in first.prompt
    assert "(1 masks)" in openai_stub.seen[1].prompt


def test_an_accepting_letter_listed_alone_at_low_probability_scores_low(openai_stub, pixels):
    """The model would say "The ..."; "A" is listed at 0.25%, B-E not at all: they get their
    share of what the list leaves, so P(accept) is about a quarter, not 1 (nothing is accepted)."""
    openai_stub.push(Reply(logprobs=[("The", -0.01), ("A", -6.0)]))
    verifier = openai_verifier(_endpoint_settings(openai_stub))
    result = verifier.verify(pixels, [PhrasePair("dog", [record(box(5, 15, 5, 25))])], [], frozenset(["mask"]))
    rest = (1 - math.exp(-0.01) - math.exp(-6.0)) / 4
    assert result.score == pytest.approx(math.exp(-6.0) / (math.exp(-6.0) + 4 * rest))
    assert result.score < 0.3


def test_openai_without_logprobs_is_a_clear_failed_precondition(openai_stub, pixels):
    openai_stub.push(Reply(content="A"))  # an answer, but the server ignored logprobs=true
    verifier = openai_verifier(_endpoint_settings(openai_stub))
    with pytest.raises(FailedPrecondition, match="gives no logprobs"):
        verifier.verify(pixels, [PhrasePair("cat", [], True)], [], frozenset(CHOICES))


@pytest.mark.parametrize("reply, error, phrase", [
    (Reply(logprobs=[("Sure", -0.1), ("The", -2.0)]), InvalidInput, "none of the choices"),
    (Reply(logprobs=[("A", -0.1)], choices=0), InvalidInput, "has no choice"),
    (Reply(status=400, error="image too large"), FailedPrecondition, "image too large"),
    (Reply(status=503, error="overloaded"), TransientError, "HTTP 503"),
])
def test_malformed_or_refused_endpoint_answers_name_the_problem(openai_stub, pixels, reply, error, phrase):
    openai_stub.push(reply)
    verifier = openai_verifier(_endpoint_settings(openai_stub))
    with pytest.raises(error, match=phrase):
        verifier.verify(pixels, [PhrasePair("cat", [], True)], [], frozenset(CHOICES))


def test_a_slow_endpoint_times_out_as_a_transient_error_after_its_retries(openai_stub, pixels):
    openai_stub.push(*[Reply(logprobs=_letters(A=0.9, B=0.1), delay_s=5.0)] * 2)
    verifier = openai_verifier(_endpoint_settings(openai_stub, mllm_timeout_s=0.2, mllm_max_retries=1))
    with pytest.raises(TransientError, match=r"no answer within 0.2 s"):
        verifier.verify(pixels, [PhrasePair("cat", [], True)], [], frozenset(CHOICES))
    assert len(openai_stub.seen) == 2  # the first try and one retry


def test_openai_verifier_behind_verify_over_grpc(openai_stub, local_store):
    openai_stub.default = Reply(logprobs=_letters(A=0.95, B=0.05))
    core = VerifierCore(openai_verifier(_endpoint_settings(openai_stub)), local_store)
    request = verifier_pb2.VerifyRequest(image=common_pb2.ImageRef(data=png(H, W)), pairs=[
        verifier_pb2.PhraseMasks(phrase="dog", masks=[record(box(5, 15, 5, 25)).to_proto()]),
        verifier_pb2.PhraseMasks(phrase="cat", is_negative=True)])
    with grpc_loopback(lambda s: add_to_server(s, core), 4 << 20) as (channel, _):
        reply = verifier_pb2_grpc.VerifierStub(channel).Verify(request, timeout=30)
        assert [p.phrase for p in reply.pairs] == ["dog", "cat"]
        assert reply.score == pytest.approx(0.95, abs=1e-6)
        openai_stub.default = Reply(content="A")  # logprobs gone: the caller is told why
        with pytest.raises(grpc.RpcError) as info:
            verifier_pb2_grpc.VerifierStub(channel).Verify(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "gives no logprobs" in info.value.details()


# -- the transformers path, on a tiny random Qwen2.5-VL saved with save_pretrained ------------

def test_transformers_scores_are_the_softmax_of_the_choice_logits(tiny_mllm_dir, tiny_mllm, pixels):
    verifier = transformers_verifier(Settings(verifier_backend="transformers", verifier_model_dir=tiny_mllm_dir))
    masks = [record(box(5, 15, 5, 25)), record(box(20, 30, 30, 50))]
    result = verifier.verify(pixels, [PhrasePair("dog", masks), PhrasePair("cat", [], True)], [],
                             frozenset(CHOICES))
    dog, cat = result.pairs
    assert [v.check for v in dog.verdicts] == ["mask", "mask", "exhaustivity"]
    for verdict in dog.verdicts + cat.verdicts:
        assert 0.0 <= verdict.score <= 1.0 and verdict.source == f"transformers:{tiny_mllm_dir.name}"
    # the first mask verdict is exactly what the loaded model's logits give on the same picture
    letters = [letter for _, letter in CHOICES["mask"]]
    prompt = verifier.templates["mask"].format(phrase="dog", count=0)
    logits = tiny_mllm.choice_logits(composite(pixels, [mask_array(masks[0], (H, W), "m")]), prompt, letters)
    assert dog.verdicts[0].score == pytest.approx(softmax(logits, letters, "m")[0], abs=1e-5)
    assert dog.score == pytest.approx(min((dog.verdicts[0].score + dog.verdicts[1].score) / 2,
                                          dog.verdicts[2].score))
    assert result.score == pytest.approx(min(dog.score, cat.score))


def test_transformers_verifier_refuses_a_directory_without_a_model(tmp_path):
    with pytest.raises(FailedPrecondition, match="no config.json"):
        transformers_verifier(Settings(verifier_model_dir=tmp_path))
