"""Tokens and roles (issue 13): the tokens file, who may call which RPC over real gRPC, an annotator
unable to act as someone else, the CLI and the studio sending and checking tokens."""

from __future__ import annotations

import json
import os
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from services.app.cli import app as cli
from services.common.auth import TokenFile, authorize, digest
from services.common.errors import InvalidInput, PermissionDenied, Unauthenticated
from services.common.grpc_server import client_channel
from services.common.pb import orchestrator_pb2 as pb, orchestrator_pb2_grpc
from services.decoder.servicer import add_to_server as add_decoder
from services.orchestrator.servicer import add_to_server as add_orchestrator
from services.studio.app import create_app
from services.studio.backend import GrpcBackend
from tests.servers import UvicornThread, grpc_loopback
from tests.studio.browser import chromium, screenshot, watch_console  # noqa: F401  (fixture)

Code = grpc.StatusCode
TOKENS = {"alice-secret": ("alice", "annotator"), "bob-secret": ("bob", "annotator"),
          "olga-secret": ("olga", "operator"), "root-secret": ("root", "admin")}


def write_tokens(path, tokens=TOKENS) -> TokenFile:
    path.write_text(json.dumps([{"sha256": digest(t), "principal": p, "role": r} for t, (p, r) in tokens.items()]))
    return TokenFile(path)


def test_the_file_holds_digests_and_is_read_again_when_it_changes(tmp_path):
    tokens = write_tokens(tmp_path / "tokens.json")
    assert "alice-secret" not in (tmp_path / "tokens.json").read_text()  # only digests on disk
    assert tokens.principal("alice-secret").name == "alice" and tokens.principal("nope") is None
    time.sleep(0.01)
    write_tokens(tmp_path / "tokens.json", {"carol-secret-long": ("carol", "operator")})
    os.utime(tmp_path / "tokens.json", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert tokens.principal("alice-secret") is None  # revoked without a restart
    assert tokens.principal("carol-secret-long").role == "operator"
    (tmp_path / "tokens.json").write_text("{broken")
    assert tokens.principal("carol-secret-long").role == "operator"  # a bad edit keeps the last good set


@pytest.mark.parametrize("content, message", [
    ("{nope", "is not JSON"),
    ('{"a": 1}', "must be a JSON list"),
    ('[{"sha256": "ab", "principal": "x", "role": "annotator"}]', "entry 0 needs a 64-hex"),
    (json.dumps([{"sha256": "0" * 64, "principal": "x", "role": "king"}]), "role"),
])
def test_a_bad_tokens_file_stops_start_up_naming_it(tmp_path, content, message):
    (tmp_path / "t.json").write_text(content)
    with pytest.raises(InvalidInput, match=message):
        TokenFile(tmp_path / "t.json")
    with pytest.raises(InvalidInput, match="No such file"):
        TokenFile(tmp_path / "missing.json")


@pytest.mark.parametrize("token, method, error", [
    (None, "/dataengine.v1.Orchestrator/Stats", Unauthenticated),
    ("forged", "/dataengine.v1.Orchestrator/Stats", Unauthenticated),
    ("alice-secret", "/dataengine.v1.Orchestrator/Submit", PermissionDenied),   # annotators do not submit
    ("alice-secret", "/dataengine.v1.Orchestrator/Export", PermissionDenied),
    ("alice-secret", "/dataengine.v1.Embedder/Embed", PermissionDenied),
    ("olga-secret", "/dataengine.v1.Orchestrator/SubmitReview", PermissionDenied),  # operators do not review
    ("olga-secret", "/dataengine.v1.Orchestrator/Unlisted", PermissionDenied),  # unknown: admin only
    ("alice-secret", "/dataengine.v1.Orchestrator/NextReview", None),
    ("alice-secret", "/dataengine.v1.Decoder/Predict", None),
    ("olga-secret", "/dataengine.v1.Orchestrator/Submit", None),
    ("root-secret", "/dataengine.v1.Orchestrator/Unlisted", None),
])
def test_roles_per_rpc(tmp_path, token, method, error):
    tokens = write_tokens(tmp_path / "t.json")
    header = f"Bearer {token}" if token else None
    if error is None:
        assert authorize(tokens, header, method).name == TOKENS[token][0]
    else:
        with pytest.raises(error):
            authorize(tokens, header, method)


@pytest.fixture
def secured(tmp_path, studio):
    """The studio fixture's cores behind gRPC servers that check tokens, and a studio over them
    with sign-in by token (a deployment: dataengine serve ... with DATAENGINE_AUTH_TOKENS_FILE)."""
    tokens = write_tokens(tmp_path / "tokens.json")
    cores = studio.backend
    with grpc_loopback(lambda s: add_orchestrator(s, cores.orchestrator), 16 << 20, tokens=tokens) as (_, orch), \
            grpc_loopback(lambda s: add_decoder(s, cores.decoder), 16 << 20, tokens=tokens) as (_, dec):
        backend = GrpcBackend(orch, dec, cores.store, 16 << 20)
        with UvicornThread(create_app(backend, 600.0, tokens)) as url:
            yield {"orchestrator": orch, "url": url, "studio": studio, "tokens": tokens}
        backend.close()


def stub(address: str, token: str = "") -> orchestrator_pb2_grpc.OrchestratorStub:
    return orchestrator_pb2_grpc.OrchestratorStub(client_channel(address, 16 << 20, token))


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_grpc_needs_a_token_of_the_right_role(secured):
    address = secured["orchestrator"]
    assert code_of(lambda: stub(address).Stats(pb.StatsRequest(), timeout=30)) == Code.UNAUTHENTICATED
    assert code_of(lambda: stub(address, "forged").Stats(pb.StatsRequest(), timeout=30)) == Code.UNAUTHENTICATED
    assert code_of(lambda: stub(address, "alice-secret").Export(
        pb.ExportRequest(format="coco", prefix="exports/x"), timeout=30)) == Code.PERMISSION_DENIED
    assert stub(address, "olga-secret").Stats(pb.StatsRequest(), timeout=30).items_by_state
    # the health service stays open for probes
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_an_annotator_acts_as_their_token_only(secured):
    alice = stub(secured["orchestrator"], "alice-secret")
    item = alice.NextReview(pb.NextReviewRequest(), timeout=30)  # no name typed: the token's principal
    assert item.lease.annotator == "alice"
    assert code_of(lambda: alice.NextReview(pb.NextReviewRequest(annotator="bob"), timeout=30)) == Code.PERMISSION_DENIED
    err_request = pb.SubmitReviewRequest(item_id=item.item_id, annotator="bob", lease_token=item.lease.token)
    with pytest.raises(grpc.RpcError) as err:
        alice.SubmitReview(err_request, timeout=30)
    assert err.value.code() == Code.PERMISSION_DENIED and "cannot act as 'bob'" in err.value.details()
    done = alice.SubmitReview(pb.SubmitReviewRequest(item_id=item.item_id, lease_token=item.lease.token), timeout=30)
    assert done.reviewer == "alice"


def test_the_studio_signs_in_by_token_and_forwards_it(secured):
    url = secured["url"]
    assert httpx.get(f"{url}/api/config").json() == {"auth": True}
    assert httpx.post(f"{url}/api/signin", json={"token": "alice-secret"}).json() == {"annotator": "alice"}
    assert httpx.post(f"{url}/api/signin", json={"token": "forged"}).status_code == 401
    assert httpx.post(f"{url}/api/signin", json={"token": "olga-secret"}).status_code == 403  # an operator
    assert httpx.post(f"{url}/api/next", headers={"X-Annotator": "alice"}).status_code == 401  # a name is not enough
    alice = {"Authorization": "Bearer alice-secret"}
    item = httpx.post(f"{url}/api/next", headers=alice).json()
    assert item["lease"]["annotator"] == "alice"
    assert httpx.get(f"{url}{item['image_url']}").status_code == 401
    assert httpx.get(f"{url}{item['image_url']}", headers=alice).status_code == 200
    click = httpx.post(f"{url}/api/items/{item['item_id']}/predict", headers=alice, timeout=60,
                       json={"points": [{"x": 100, "y": 100, "label": 1}]})
    assert click.status_code == 200, click.text
    done = httpx.post(f"{url}/api/items/{item['item_id']}/submit", headers=alice, timeout=60,
                      json={"lease_token": item["lease"]["token"], "decision": "discard"})
    assert done.status_code == 200 and secured["studio"].manifest(item["item_id"]).reviewer == "alice"


def test_the_cli_sends_dataengine_auth_token(secured):
    address = secured["orchestrator"]
    refused = CliRunner().invoke(cli, ["status", "--address", address, "--json"])
    assert refused.exit_code == 1 and "UNAUTHENTICATED" in refused.output
    ok = CliRunner().invoke(cli, ["status", "--address", address, "--json"], env={"DATAENGINE_AUTH_TOKEN": "olga-secret"})
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["review_waiting"]["review"] == 1


def test_an_annotator_signs_in_with_a_token_in_the_browser(secured, chromium):  # noqa: F811
    from tests.studio.pages import take_next

    page = chromium.page()
    errors: list[str] = []
    watch_console(page, errors)
    page.goto(f"{secured['url']}/")
    page.get_by_test_id("signin-token").wait_for()  # the studio asks for a token, not a name
    assert not page.get_by_test_id("signin-name").is_visible()
    page.get_by_test_id("signin-token").fill("forged")
    page.get_by_test_id("signin-submit").click()
    page.get_by_test_id("signin-error").filter(has_text="401").wait_for()
    page.get_by_test_id("signin-token").fill("bob-secret")
    page.get_by_test_id("signin-submit").click()
    page.get_by_test_id("annotator").filter(has_text="bob").wait_for()
    view = take_next(page)  # the image, queue and item all came with bob's token
    assert view["lease"]["annotator"] == "bob"
    screenshot(page, "09-token-signin")
    assert not [e for e in errors if "401" not in e], errors
