"""In-memory caches of the decoder: loaded embeddings and recent low-res logits.

An interactive session clicks many times on one image: the embedding is read from the store and
converted to float32 on the device once, and each click's logits are kept here so the next click
(which sends them back as ``mask_input_key``) never waits on the store.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

import numpy as np
import torch

from services.common.embedding import StoredEmbedding
from services.decoder.prompt_decoder import PromptDecoder

V = TypeVar("V")


class LruCache(Generic[V]):
    """A thread-safe least-recently-used map of at most ``capacity`` entries (0: keeps nothing)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: V) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get_or_load(self, key: str, load: Callable[[], V]) -> V:
        """The cached value, or ``load()`` (outside the lock: loads of different keys overlap)."""
        value = self.get(key)
        if value is None:
            value = load()
            self.put(key, value)
        return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items


@dataclass(frozen=True)
class LoadedEmbedding:
    """A stored embedding, its features as a 1xCx64x64 float32 tensor on the model's device, and the
    prompt decoder over them (built once: it holds the dense positional encoding)."""

    key: str
    stored: StoredEmbedding
    features: torch.Tensor
    decoder: PromptDecoder


class EmbeddingCache(LruCache[LoadedEmbedding]):
    """Embeddings by object key (about 4 MiB each for C = 256 once in float32)."""


class LogitsCache(LruCache[np.ndarray]):
    """Low-res logits (Cx256x256 float32) of recent Predict calls, by their object key."""
