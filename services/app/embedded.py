"""``dataengine run``: the whole engine in one process, with no external servers.

The same stage code as the deployment: the four step handlers, ``Orchestrator.report`` deciding
every next step, manifests as the source of truth. Only the plumbing differs: a local-directory
store under ``OUT/.dataengine``, an in-memory index, and an in-process step queue instead of
Redis and Celery. Everything that matters is on disk after each step, so an interrupted run
started again (``resume``) re-dispatches only the steps whose output is missing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

from services.common.errors import DataEngineError, InvalidInput, NotFound
from services.common.image_source import ImageSource
from services.common.sam_models import LoadedSam, load_from_settings
from services.common.settings import Settings
from services.common.storage import LocalStore
from services.concepts import step as concepts_step
from services.concepts.core import ConceptsCore
from services.decoder import step as decoder_step
from services.decoder.core import DecoderCore
from services.embedder import step as embedder_step
from services.embedder.core import EmbedderCore
from services.orchestrator import exports
from services.orchestrator.dispatch import InlineDispatcher
from services.orchestrator.engine import Orchestrator, RerunSummary
from services.orchestrator.index import MemoryIndex
from services.orchestrator.model import DECODE, EMBED, PROPOSE, VERIFY, Item, ItemState, Stage, manifest_key
from services.verifier import step as verifier_step
from services.verifier.core import VerifierCore

STORE_DIR = ".dataengine"


@dataclass
class FileResult:
    """One input file's outcome, a line of ``report.json``.

    file: the path as given relative to the input root. item_id: "" when the file never became an
    item (unreadable or empty). score: the verifier's item score in [0, 1], if it got that far.
    """

    file: str
    state: str
    reason: str = ""
    item_id: str = ""
    score: float | None = None
    phrases: int = 0
    masks: int = 0

    @classmethod
    def of(cls, file: str, item: Item) -> "FileResult":
        return cls(file=file, state=item.state.name.lower(), reason=item.reason, item_id=item.item_id,
                   score=item.score, phrases=len(item.phrases), masks=sum(len(p.masks) for p in item.phrases))


class EmbeddedEngine:
    """The engine over ``out_dir/.dataengine``; ``sam`` is shared by the embedder and the decoder."""

    def __init__(self, settings: Settings, out_dir: Path, sam: LoadedSam | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.store = LocalStore(self.out_dir / STORE_DIR)
        sam = sam if sam is not None else load_from_settings(settings)
        self.sam = sam
        embedder = EmbedderCore(sam, self.store, settings.embed_batch_size, settings.max_image_pixels)
        decoder = DecoderCore(sam, self.store, settings.embedding_cache_size)
        concepts = ConceptsCore.from_settings(settings, self.store)
        verifier = VerifierCore.from_settings(settings, self.store)
        handlers = {EMBED: embedder_step.make_handler(embedder),
                    PROPOSE: concepts_step.make_handler(concepts, self.store),
                    DECODE: decoder_step.make_handler(decoder, self.store),
                    VERIFY: verifier_step.make_handler(verifier, self.store)}
        self.dispatcher = InlineDispatcher(handlers, settings.max_attempts)
        self.orchestrator = Orchestrator.from_settings(settings, self.store, MemoryIndex(), self.dispatcher)

    def resume(self) -> int:
        """Finish what an interrupted run left; returns how many items it had unfinished."""
        unfinished = self.orchestrator.resume()
        self.dispatcher.run(self.orchestrator.report)
        return unfinished

    def rerun(self, states: Sequence[ItemState]) -> RerunSummary:
        """Decode and verify again, with this engine's decoder, the waiting items in ``states`` that
        no human settled (``Orchestrator.rerun``); they are routed anew before it returns."""
        self.resume()
        summary = self.orchestrator.rerun(states, self.sam.decoder_id)
        self.dispatcher.run(self.orchestrator.report)
        return summary

    def process(self, path: Path, source: str, labels: Sequence[str] = (),
                stage: Stage = Stage.FULLY_AUTOMATIC) -> FileResult:
        """Submit one file and run it to a settled state (a file done before is not redone)."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            return FileResult(source, "failed", f"cannot read the file: {exc.strerror or exc}")
        try:
            (item_id,) = self.orchestrator.submit([ImageSource(data=data, filename=source)], labels, stage)
        except DataEngineError as exc:  # e.g. an empty file: it never becomes an item
            return FileResult(source, "failed", str(exc))
        self.dispatcher.run(self.orchestrator.report)
        return FileResult.of(source, self.orchestrator.load(item_id))

    def write_outputs(self, results: Sequence[FileResult], states=exports.DATASET_STATES) -> dict[str, Path]:
        """``coco.json``, ``saco.json``, ``sa1b/`` and ``report.json`` in ``out_dir``."""
        return write_outputs(self.store, self.out_dir, results, states)


def write_outputs(store: LocalStore, out_dir: Path, results: Sequence[FileResult],
                  states=exports.DATASET_STATES) -> dict[str, Path]:
    """The exports and ``report.json`` of a run's ``out_dir`` from the manifests in ``store``."""
    paths = {"coco": out_dir / "coco.json", "saco": out_dir / "saco.json",
             "sa1b": out_dir / "sa1b", "report": out_dir / "report.json"}
    for fmt in exports.FORMATS:
        exports.export(store, fmt, paths[fmt], states)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.state] = counts.get(r.state, 0) + 1
    report = {"files": len(results), "by_state": counts, "exported_states": sorted(s.name.lower() for s in states),
              "items": [asdict(r) for r in results]}
    paths["report"].write_text(json.dumps(report, indent=1))
    return paths


def refresh_outputs(out_dir: Path) -> tuple[dict[str, Path], dict[str, int]]:
    """Rewrite ``out_dir``'s exports and report from its manifests (after a review in the studio):
    each file of the run's report gets its item's state now. Needs no model. Returns the paths and
    the files per state."""
    out_dir = Path(out_dir)
    store_dir, report_path = out_dir / STORE_DIR, out_dir / "report.json"
    if not store_dir.is_dir() or not report_path.is_file():
        raise NotFound(f"{out_dir} holds no run: no {STORE_DIR}/ and report.json (dataengine run IMAGES --out {out_dir})")
    store = LocalStore(store_dir)
    try:
        rows = json.loads(report_path.read_text())["items"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"{report_path} is not a run report: {exc!r}") from None
    results = []
    for row in rows:
        result = FileResult(**{f.name: row[f.name] for f in fields(FileResult) if f.name in row})
        if result.item_id:
            try:
                result = FileResult.of(result.file, Item.from_json(json.loads(store.get(manifest_key(result.item_id)))))
            except NotFound:
                pass
        results.append(result)
    paths = write_outputs(store, out_dir, results)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.state] = counts.get(r.state, 0) + 1
    return paths, counts
