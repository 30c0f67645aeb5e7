"""Model identity across services: a decoder fine-tuned on the base's frozen encoder keeps using
the embeddings the base's embedder stored; a checkpoint of another encoder is refused them.

Over real gRPC on loopback: the Embedder service (base checkpoint) embeds, then Decoder services on
the fine-tuned checkpoint and on a foreign one are asked for masks of that stored embedding.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from services.common.model_card import ModelCard, card_path
from services.common.pb import common_pb2, decoder_pb2, decoder_pb2_grpc, embedder_pb2, embedder_pb2_grpc
from services.common.sam_models import file_sha256, load_sam, save_random_checkpoint
from services.common.storage import LocalStore
from services.decoder import servicer as decoder_servicer
from services.decoder.core import DecoderCore
from services.embedder.core import EmbedderCore
from services.embedder.servicer import add_to_server as add_embedder
from tests.common.image_cases import png
from tests.servers import grpc_loopback

LIMIT = 16 << 20


def fine_tuned_copy(base: Path, path: Path) -> Path:
    """``base`` with its mask decoder's weights changed and a model card naming the base's encoder,
    as ``train decoder`` writes them (the encoder's weights untouched)."""
    state = torch.load(base, weights_only=True)
    for name in state:
        if name.startswith("mask_decoder.") and state[name].is_floating_point():
            state[name] = state[name] + 0.05
    torch.save(state, path)
    sha, base_sha = file_sha256(path), file_sha256(base)
    ModelCard("tiny", path.name, sha, f"tiny-{sha[:12]}", f"tiny-{base_sha[:12]}", str(base), base_sha, [], [], 0, 0,
              {}, [], {}, {}, "cpu").write(card_path(path))
    return path


def _decoder(sam, store):
    core = DecoderCore(sam, store, cache_size=4)
    return core, grpc_loopback(lambda s: decoder_servicer.add_to_server(s, core), LIMIT)


def test_a_new_decoder_reuses_the_stored_embeddings_and_another_encoder_is_refused(tiny_checkpoint, tmp_path):
    store = LocalStore(tmp_path / "bucket")
    base = load_sam("tiny", tiny_checkpoint)
    embedder = EmbedderCore(base, store, batch_size=1, max_pixels=100_000)
    with grpc_loopback(lambda s: add_embedder(s, embedder), LIMIT) as (channel, _):
        reply = embedder_pb2_grpc.EmbedderStub(channel).Embed(
            embedder_pb2.EmbedRequest(images=[common_pb2.ImageRef(data=png(48, 64), filename="a.png")]), timeout=60)
    ref = reply.images[0].embeddings[0]
    assert ref.model_id == base.encoder_id
    stored = {k: store.get(k) for k in store.list("embeddings/")}

    tuned = load_sam("tiny", fine_tuned_copy(tiny_checkpoint, tmp_path / "sam_tiny_ft.pth"))
    assert tuned.encoder_id == base.encoder_id and tuned.decoder_id != base.decoder_id
    request = decoder_pb2.PredictRequest(embedding_key=ref.key, points=[common_pb2.Point(x=30, y=20, label=1)],
                                         multimask_output=True)
    core, server = _decoder(tuned, store)
    with server as (channel, _):
        masks = decoder_pb2_grpc.DecoderStub(channel).Predict(request, timeout=60)
    core.close()
    assert len(masks.masks) == 3 and all(list(m.segmentation.size) == [48, 64] for m in masks.masks)
    assert masks.logits_key.startswith(f"logits/{tuned.decoder_id}/")  # the new decoder's own keys
    # Reused, not redone: the embeddings are the very objects the base's embedder wrote.
    assert {k: store.get(k) for k in store.list("embeddings/")} == stored

    # Its embedder (the same frozen encoder) names the same embedding: nothing to re-embed.
    assert EmbedderCore(tuned, store, 1, 100_000).model_id == ref.model_id

    foreign = load_sam("tiny", save_random_checkpoint("tiny", tmp_path / "other.pth", seed=7))
    assert foreign.encoder_id != base.encoder_id
    core, server = _decoder(foreign, store)
    with server as (channel, _), pytest.raises(grpc.RpcError) as refused:
        decoder_pb2_grpc.DecoderStub(channel).Predict(request, timeout=60)
    core.close()
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert base.encoder_id in refused.value.details() and foreign.encoder_id in refused.value.details()
