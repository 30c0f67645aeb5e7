"""The committed stubs are exactly what protoc makes of proto/ today."""

from services.common import protogen
from services.common.pb import (concepts_pb2_grpc, decoder_pb2_grpc, embedder_pb2_grpc,
                                orchestrator_pb2_grpc, verifier_pb2_grpc)


def test_stubs_match_proto_sources(tmp_path):
    fresh = {p.name: p.read_text() for p in protogen.generate(tmp_path)}
    committed = {p.name: p.read_text() for p in protogen.PB_DIR.glob("*_pb2*.py*")}
    assert set(fresh) == set(committed), "stub files differ from proto/: run `make protos`"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"stubs out of date with proto/ ({stale}): run `make protos`"


def test_every_service_of_the_architecture_is_defined():
    rpcs = {
        embedder_pb2_grpc.EmbedderServicer: {"Embed"},
        decoder_pb2_grpc.DecoderServicer: {"Predict", "GenerateMasks"},
        concepts_pb2_grpc.ConceptsServicer: {"Propose"},
        verifier_pb2_grpc.VerifierServicer: {"Verify"},
        orchestrator_pb2_grpc.OrchestratorServicer: {
            "Submit", "GetItem", "ListItems", "Stats", "NextReview", "SubmitReview", "Heartbeat", "ReleaseReview",
            "AnnotatorStats", "Export"},
    }
    for servicer, names in rpcs.items():
        defined = {n for n in vars(servicer) if not n.startswith("_")}
        assert names <= defined, f"{servicer.__name__} lacks {names - defined}"
