"""The hostile-input run's findings at the orchestrator's gRPC boundary (issue 13): each is refused
with INVALID_ARGUMENT and a message a client can read, and nothing changes."""

from __future__ import annotations

import grpc
import pytest

from services.common.pb import orchestrator_pb2 as pb
from tests.orchestrator.test_servicer import (engine, inline, png, rpc_error, server, stub,  # noqa: F401
                                              submit)
from services.orchestrator.index import ids

Code = grpc.StatusCode


def test_a_forged_page_token_is_refused(engine, stub):
    submit(stub, inline(png(1), "a.png"), labels=["dog"])
    first = stub.ListItems(pb.ListItemsRequest(page_size=1), timeout=30)
    assert len(first.items) == 1
    err = rpc_error(stub.ListItems, pb.ListItemsRequest(page_size=1, page_token="zzzz-forged"))
    assert err.code() == Code.INVALID_ARGUMENT and "page_token 'zzzz-forged' is not one ListItems returned" in err.details()
    # A bare item id (what tokens used to be) positions nothing either: refused by its form.
    err = rpc_error(stub.ListItems, pb.ListItemsRequest(page_size=1, page_token=first.items[0].item_id))
    assert err.code() == Code.INVALID_ARGUMENT and "is not one ListItems returned" in err.details()
    assert first.next_page_token == ""  # one item, one page


def test_a_huge_id_gets_a_readable_refusal(stub):
    err = rpc_error(stub.GetItem, pb.GetItemRequest(item_id="a" * 200_000))
    assert err.code() == Code.INVALID_ARGUMENT and "200000 characters, at most 128" in err.details()
    assert len(err.details()) < 200  # the id is not echoed back into the trailer


def test_bytes_that_are_not_a_protobuf_name_the_message_type(server):
    _, address = server
    with grpc.insecure_channel(address) as channel:
        raw = channel.unary_unary("/dataengine.v1.Orchestrator/GetItem")  # no serializer: bytes as they are
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\xff not a message", timeout=30)
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert "is not a serialized dataengine.v1.GetItemRequest message" in err.value.details()


@pytest.mark.parametrize("labels, message", [
    (["x" * 1_000_000], "has 1000000 characters"),
    (["dog\x00cat"], "control characters"),
    (["\x1b[31mred"], "control characters"),
])
def test_labels_a_client_should_not_send(engine, stub, labels, message):
    err = rpc_error(stub.Submit, pb.SubmitRequest(images=[inline(png(2), "b.png")], known_labels=labels))
    assert err.code() == Code.INVALID_ARGUMENT and message in err.details()
    assert list(ids(engine.orchestrator.index)) == []  # nothing ingested


def test_submit_sends_the_good_files_and_reports_the_bad_ones(engine, server, tmp_path):
    from typer.testing import CliRunner

    from services.app.cli import app

    _, address = server
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(10))
    (folder / "b.png").write_bytes(b"")  # empty: the server would refuse the whole request
    (folder / "c.png").write_bytes(png(11))
    result = CliRunner().invoke(app, ["submit", str(folder), "--address", address, "--label", "dog"])
    assert result.exit_code == 1
    sent = [line.split("\t")[1] for line in result.stdout.splitlines()]
    assert sent == [str(folder / "a.png"), str(folder / "c.png")]
    said = " ".join(result.stderr.split())  # rich wraps long lines
    assert "b.png: empty (0 bytes)" in said and "1 of 3 files were not submitted" in said
    assert len(list(ids(engine.orchestrator.index))) == 2
