"""Input limits are settings (DATAENGINE_MAX_LABELS, _MAX_LABEL_CHARS, _MAX_ID_CHARS): each core
built from the settings enforces the configured value and names the setting when it refuses."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidInput
from services.common.settings import Settings
from services.concepts.core import ConceptsCore
from services.orchestrator.dispatch import InlineDispatcher
from services.common.image_source import ImageSource
from services.orchestrator.engine import Orchestrator
from services.orchestrator.index import MemoryIndex
from tests.common.image_cases import png

TIGHT = Settings(max_labels=2, max_label_chars=10, max_id_chars=30)


def test_the_concepts_core_enforces_the_configured_limits(local_store):
    local_store.put("in/a.png", png(8, 8))
    core = ConceptsCore("labels", local_store, settings=TIGHT)
    assert [p.text for p in core.propose("in/a.png", ["red car", "dog"]).phrases] == ["red car", "dog"]
    with pytest.raises(InvalidInput, match=r"3 known labels; at most 2 \(DATAENGINE_MAX_LABELS\)"):
        core.propose("in/a.png", ["a", "b", "c"])
    with pytest.raises(InvalidInput, match=r"known label 0 has 11 characters .* at most 10 \(DATAENGINE_MAX_LABEL_CHARS\)"):
        core.propose("in/a.png", ["yellow taxi"])
    # the defaults are wider: the same requests pass
    assert len(ConceptsCore("labels", local_store).propose("in/a.png", ["a dog", "cat", "yellow taxi"]).phrases) == 3


def test_the_orchestrator_enforces_the_configured_limits(local_store):
    engine = Orchestrator.from_settings(TIGHT, local_store, MemoryIndex(), InlineDispatcher({}, 1))
    with pytest.raises(InvalidInput, match=r"bad item id: 31 characters, at most 30 \(DATAENGINE_MAX_ID_CHARS\)"):
        engine.load("f" * 31)
    with pytest.raises(InvalidInput, match=r"at most 2 \(DATAENGINE_MAX_LABELS\)"):
        engine.submit([ImageSource(data=png(4, 4), filename="a.png")], known_labels=["a", "b", "c"])
    assert list(local_store.list("")) == []  # nothing ingested
    with pytest.raises(InvalidInput, match="page_token .* is not one ListItems returned"):
        engine.list_items(token="f" * 31)


def test_limits_settings_have_floors():
    with pytest.raises(ValueError, match="max_id_chars"):
        Settings(max_id_chars=10)  # item ids are 24 hex digits
