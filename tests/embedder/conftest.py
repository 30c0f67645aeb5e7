"""The tiny SAM, loaded once, and embedder cores over the test stores."""

from __future__ import annotations

import pytest

from services.common.sam_models import LoadedSam, load_sam
from services.embedder.core import EmbedderCore


@pytest.fixture(scope="session")
def tiny_sam(tiny_checkpoint) -> LoadedSam:
    return load_sam("tiny", tiny_checkpoint, "cpu")


@pytest.fixture
def core(tiny_sam, local_store) -> EmbedderCore:
    return EmbedderCore(tiny_sam, local_store, batch_size=2, max_pixels=89_478_485)
