"""Embedder cores over the test stores."""

from __future__ import annotations

import pytest

from services.embedder.core import EmbedderCore


@pytest.fixture
def core(tiny_sam, local_store) -> EmbedderCore:
    return EmbedderCore(tiny_sam, local_store, batch_size=2, max_pixels=89_478_485)
