"""The concepts core: an image and its known labels in, a ``Proposal`` (noun phrases and hard
negatives) out. The gRPC servicer, the pipeline step and the embedded runner all call this class.

Backends sit behind one interface, ``ConceptBackend``, in the registry ``BACKENDS``: the offline
default ``ontology`` (known labels and hard negatives from a taxonomy), ``labels`` (the known labels
alone), and the multimodal models ``openai`` and ``transformers``, which look at the pixels. Every
backend's proposal is cleaned the same way (``phrases.clean_proposal``), and its hard negatives
read against the taxonomy (``ontology.drop_contradictions``).
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol, Sequence

import numpy as np

from services.common.concepts import NounPhrase, Proposal
from services.common.errors import FailedPrecondition, InvalidInput, NotFound
from services.common.images import decode_image, image_size
from services.common.limits import Limits
from services.common.settings import Settings
from services.common.storage import ObjectStore, open_store
from services.concepts.grounding import Grounder, GroundingParams, ground_proposal, make_grounder
from services.concepts.ontology import Taxonomy, drop_contradictions
from services.concepts.phrases import clean_labels, clean_proposal
from services.common.image_source import ImageSource


class ConceptBackend(Protocol):
    """A way to propose concepts.

    name: the registry name. needs_pixels: whether ``propose`` looks at the image (the core then
    decodes it; otherwise the image is only checked to exist).
    """

    name: str
    needs_pixels: bool

    def propose(self, pixels: np.ndarray | None, known_labels: Sequence[str], max_positives: int,
                max_negatives: int) -> Proposal:
        """pixels: HxWx3 uint8 RGB, or None when ``needs_pixels`` is False.
        known_labels: clean phrases (``phrases.clean_phrase``), unique, in the caller's order.
        max_positives, max_negatives: caps on the proposal's lengths; 0 is the backend's default.
        """
        ...


class LabelsBackend:
    """Offline: the positives are the known labels, image-level (no box or point), score 1.0.

    It proposes no hard negatives (that needs an ontology or a model) and never reads the image.
    """

    name = "labels"
    needs_pixels = False

    def propose(self, pixels: np.ndarray | None, known_labels: Sequence[str], max_positives: int = 0,
                max_negatives: int = 0) -> Proposal:
        labels = list(known_labels)[:max_positives] if max_positives > 0 else list(known_labels)
        return Proposal(phrases=[NounPhrase(text=label, score=1.0, source=self.name) for label in labels])


# name -> factory(settings). Model backends import their heavy libraries inside the factory, so
# a service that never uses them never loads them.
def _ontology(settings: Settings) -> ConceptBackend:
    from services.concepts.ontology import OntologyBackend

    return OntologyBackend.from_settings(settings)


def _openai(settings: Settings) -> ConceptBackend:
    from services.concepts.model_backends import OpenAIConcepts

    return OpenAIConcepts.from_settings(settings)


def _transformers(settings: Settings) -> ConceptBackend:
    from services.concepts.model_backends import TransformersConcepts

    return TransformersConcepts.from_settings(settings)


BACKENDS: dict[str, Callable[[Settings], ConceptBackend]] = {
    "labels": lambda settings: LabelsBackend(), "ontology": _ontology, "openai": _openai,
    "transformers": _transformers}


def make_backend(name: str, settings: Settings | None = None) -> ConceptBackend:
    """The backend registered as ``name``, configured by ``settings`` (default: the environment's);
    ``InvalidInput`` lists the known ones."""
    factory = BACKENDS.get(name)
    if factory is None:
        raise InvalidInput(f"unknown concepts backend {name!r}; one of {', '.join(sorted(BACKENDS))}")
    return factory(settings if settings is not None else Settings())


class ConceptsCore:
    """Concept proposal over an object store.

    backend: the default backend (or its registry name); a request may name another.
    store: where image keys are looked up; may be None for callers that pass image bytes.
    max_pixels: decode limit per image, for backends that read pixels (decompression-bomb guard).
    """

    def __init__(self, backend: ConceptBackend | str = "labels", store: ObjectStore | None = None,
                 max_pixels: int = 89_478_485, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else Settings()
        default = make_backend(backend, self.settings) if isinstance(backend, str) else backend
        self.backend = default
        self.store = store
        self.max_pixels = max_pixels
        self._taxonomy: Taxonomy | None = None  # read on first use (the ontology backend shares the shipped one)
        # Other backends are built on first request and kept: a model backend loads its weights once.
        self._backends: dict[str, ConceptBackend] = {default.name: default}
        self._lock = threading.Lock()
        self._grounder: Grounder | None = None  # the settings' grounding backend, loaded on first use

    @classmethod
    def from_settings(cls, settings: Settings, store: ObjectStore | None = None) -> "ConceptsCore":
        """The core the settings describe (``concepts_backend``), over ``store`` or the settings' store."""
        return cls(settings.concepts_backend, store if store is not None else open_store(settings),
                   settings.max_image_pixels, settings)

    def backend_named(self, name: str = "") -> ConceptBackend:
        """The backend ``name`` ("" is the default one)."""
        if not name:
            return self.backend
        with self._lock:
            if name not in self._backends:
                self._backends[name] = make_backend(name, self.settings)
            return self._backends[name]

    def propose(self, image: ImageSource | bytes | str, known_labels: Sequence[str] = (), max_positives: int = 0,
                max_negatives: int = 0, backend: str = "") -> Proposal:
        """Propose concepts for ``image`` (encoded bytes, an object key or an ``ImageSource``).

        The image is decoded only if the backend reads pixels; otherwise its header is still
        read, so a missing key (``NotFound``) or an unreadable file (``InvalidInput``) fails here
        and not two stages later. Known labels are cleaned before the backend sees them, and every
        backend's proposal after (``phrases``): lower-case, singular, no possessives or repeats, no
        phrase both positive and negative, no negative that is a known label or a positive, or
        its synonym, ancestor, descendant or companion in the taxonomy.
        max_positives, max_negatives: caps, 0 for the settings' ``concepts_max_positives`` and
        ``concepts_max_negatives``. An empty label list is a valid request.
        """
        for name, value in (("max_positives", max_positives), ("max_negatives", max_negatives)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(f"{name} must be an integer >= 0 (0: the configured default), got {value!r}")
        labels = clean_labels(known_labels, Limits.from_settings(self.settings))
        chosen = self.backend_named(backend)
        grounder = self.grounder()
        pixels = self._read(ImageSource.of(image), chosen.needs_pixels or grounder is not None)
        positives = max_positives or self.settings.concepts_max_positives
        negatives = max_negatives or self.settings.concepts_max_negatives
        # Cleaned without the negatives' cap: contradictions go first, the cap counts what is left.
        cleaned = clean_proposal(chosen.propose(pixels, labels, positives, negatives), positives, 1 << 30)
        proposal = drop_contradictions(cleaned, labels, self.taxonomy(), negatives)
        if grounder is None:
            return proposal
        vocabulary = [*labels, *self.taxonomy().categories()] if self.settings.grounding_vocabulary else []
        return ground_proposal(grounder, GroundingParams.from_settings(self.settings), pixels, proposal,
                               vocabulary, positives)

    def grounder(self) -> Grounder | None:
        """The settings' grounding backend (``grounding_backend``), loaded once; None without one."""
        if self.settings.grounding_backend in ("", "none"):
            return None
        with self._lock:
            if self._grounder is None:
                self._grounder = make_grounder(self.settings.grounding_backend, self.settings)
            return self._grounder

    def taxonomy(self) -> Taxonomy:
        """The taxonomy of the settings (``concepts_taxonomy``, else the shipped one), read once."""
        if self._taxonomy is None:
            self._taxonomy = Taxonomy.load(self.settings.concepts_taxonomy)
        return self._taxonomy

    def _read(self, source: ImageSource, decode: bool) -> np.ndarray | None:
        """HxWx3 uint8 RGB pixels when ``decode``, else None once the header has been read."""
        name = source.describe(0)
        if source.key is not None and self.store is None:
            raise FailedPrecondition(f"{name}: this concepts core has no object store to read keys from")
        data = source.data
        if data is None:
            try:
                data = self.store.get(source.key)
            except NotFound:
                raise NotFound(f"{name} not found in the object store") from None
        if not decode:
            image_size(data, self.max_pixels, name)  # InvalidInput naming the image if it is no image
            return None
        return decode_image(data, self.max_pixels, name=name).pixels
