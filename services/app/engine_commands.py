"""Orchestrator commands: ``run`` (the embedded main job) and ``refresh`` (its exports again after a
review), ``submit`` and ``status`` (gRPC clients of a deployment), ``export`` (from the object
store) and ``reconcile`` (rebuild Redis indices).

Thin: each parses its arguments, calls the same core code the services run, and prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.table import Table

from services.app.cli_common import (GROUNDING, GROUNDING_MODEL_DIR, GROUNDING_VOCABULARY, collect_images, console, fail,
                                 file_name, progress, settings as make_settings, stdout)
from services.common.errors import DataEngineError
from services.common.settings import Settings

LABEL_HELP = "A noun phrase known to be in the images (repeat for more); the offline concepts backend uses these."
STAGE_HELP = "1 assisted_manual, 2 semi_automatic or 3 fully_automatic."


def parse_amg(text: str | None) -> dict | None:
    """``--amg-params`` JSON as a dict (None when not given); exits naming the problem."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        fail(f"--amg-params is not JSON: {exc}")
    if not isinstance(value, dict):
        fail(f"--amg-params must be a JSON object like '{{\"points_per_side\": 16}}', got {text!r}")
    return value


def _stage(text: str):
    from services.orchestrator.model import Stage

    try:
        return Stage.parse(text)
    except DataEngineError as exc:
        fail(str(exc))


def run(
    images: Path = typer.Argument(..., help="Folder of images (searched recursively) or one image."),
    out: Path = typer.Option(..., "--out", help="Output folder: coco.json, saco.json, sa1b/, report.json."),
    model_type: Optional[str] = typer.Option(None, "--model-type", help="vit_h, vit_l, vit_b or tiny."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="SAM checkpoint (.pth)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N."),
    label: list[str] = typer.Option([], "--label", help=LABEL_HELP),
    stage: str = typer.Option("3", "--stage", help=STAGE_HELP),
    amg_params: Optional[str] = typer.Option(None, "--amg-params",
                                             help="Grid-mask parameters as JSON, e.g. '{\"points_per_side\": 16}'."),
    grounding: Optional[str] = GROUNDING,
    grounding_model_dir: Optional[Path] = GROUNDING_MODEL_DIR,
    grounding_vocabulary: Optional[bool] = GROUNDING_VOCABULARY,
) -> None:
    """The whole engine in one process, no servers: every image to a final state, then the exports.

    Interrupted and started again with the same OUT, it resumes without redoing finished steps.
    """
    from services.app.embedded import EmbeddedEngine

    settings = make_settings(model_type=model_type, checkpoint=checkpoint, device=device, amg_params=parse_amg(amg_params),
                             grounding_backend=grounding, grounding_model_dir=grounding_model_dir,
                             grounding_vocabulary=grounding_vocabulary)
    chosen_stage = _stage(stage)
    if not images.exists():
        fail(f"{images} does not exist")
    files = collect_images([images])
    if not files:
        fail(f"no image files found in {images}")
    root = images if images.is_dir() else images.parent
    try:
        engine = EmbeddedEngine(settings, out)
    except (DataEngineError, ValueError, OSError) as exc:
        fail(str(exc), code=1)
    results = []
    try:
        resumed = engine.resume()
        if resumed:
            console.print(f"resumed {resumed} unfinished items from an earlier run")
        with progress() as bar:
            task = bar.add_task("images", total=len(files))
            for path in files:
                result = engine.process(path, file_name(path, root), label, chosen_stage)
                results.append(result)
                if result.state == "failed":
                    bar.console.print(f"[red]{result.file}: {result.reason}[/red]")
                bar.advance(task)
        paths = engine.write_outputs(results)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: run the same command again to resume")
        raise typer.Exit(130)
    except DataEngineError as exc:  # storage trouble that outlived the retries
        fail(str(exc), code=1)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.state] = counts.get(r.state, 0) + 1
    _table("items by final state", counts)
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")
    waiting = counts.get("review", 0) + counts.get("rejected", 0)
    if waiting:
        model = f" --model-type {settings.model_type}" + (f" --checkpoint {settings.checkpoint}"
                                                          if settings.checkpoint else "")
        typer.echo(f"{waiting} items wait for a human (review: {counts.get('review', 0)}, fix queue: "
                   f"{counts.get('rejected', 0)}). Review them in the browser:\n"
                   f"  dataengine studio {out}{model}\n"
                   f"then refresh the exports: dataengine refresh {out}")


def refresh(
    out: Path = typer.Argument(..., help="The --out folder of dataengine run."),
) -> None:
    """Rewrite OUT's exports and report.json from its manifests, after a review in the studio
    (human masks, decisions and provenance included). Needs no model."""
    from services.app.embedded import refresh_outputs

    try:
        paths, counts = refresh_outputs(out)
    except DataEngineError as exc:
        fail(str(exc), code=1)
    _table("items by state", counts)
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


def _channel(settings: Settings, address: str | None):
    from services.common.grpc_server import client_channel
    from services.common.tls import TlsFiles

    target = address or f"localhost:{settings.orchestrator_port}"
    return client_channel(target, settings.max_message_bytes, settings.auth_token, TlsFiles.from_settings(settings))


def _call(fn, *args):
    import grpc

    try:
        return fn(*args, timeout=120)
    except grpc.RpcError as exc:
        fail(f"{exc.code().name}: {exc.details()}", code=1)


def _batches(files: list[Path], max_bytes: int, max_count: int) -> Iterator[list[Path]]:
    """Files in groups that fit one request (a file larger than the limit travels alone and the
    server names it)."""
    batch, size = [], 0
    for path in files:
        n = path.stat().st_size
        if batch and (size + n > max_bytes or len(batch) >= max_count):
            yield batch
            batch, size = [], 0
        batch.append(path)
        size += n
    if batch:
        yield batch


def submit(
    images: list[Path] = typer.Argument(..., help="Image files or folders."),
    label: list[str] = typer.Option([], "--label", help=LABEL_HELP),
    stage: str = typer.Option("3", "--stage", help=STAGE_HELP),
    address: Optional[str] = typer.Option(None, "--address", help="Orchestrator host:port."),
    batch: int = typer.Option(16, "--batch", min=1, help="Images per request."),
) -> None:
    """Submit images to a running orchestrator; prints one `ITEM_ID<TAB>FILE` line per image.

    A file that is empty, unreadable or refused fails alone: the others are submitted, each bad one
    is reported on stderr, and the command exits 1."""
    import grpc

    from services.common.pb import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

    settings = make_settings()
    chosen_stage = _stage(stage)
    files = collect_images(images)
    if not files:
        fail("no image files found in " + ", ".join(map(str, images)))
    stub = orchestrator_pb2_grpc.OrchestratorStub(_channel(settings, address))
    bad = 0

    def refused(path: Path, why: str) -> None:
        nonlocal bad
        bad += 1
        console.print(f"[red]{file_name(path)}: {why}[/red]")

    def send(group: list[tuple[Path, bytes]]) -> None:
        request = orchestrator_pb2.SubmitRequest(
            images=[common_pb2.ImageRef(data=data, filename=file_name(p)) for p, data in group],
            known_labels=label, stage=int(chosen_stage))
        try:
            reply = stub.Submit(request, timeout=120)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT or len(group) == 1:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    return refused(group[0][0], exc.details())
                fail(f"{exc.code().name}: {exc.details()}", code=1)
            for one in group:  # the server refuses a request whole: find the bad file
                send([one])
            return
        for item_id, (path, _) in zip(reply.item_ids, group):
            typer.echo(f"{item_id}\t{file_name(path)}")

    # Half the message limit leaves room for the request's other fields and protobuf framing.
    for paths in _batches(files, settings.max_message_bytes // 2, batch):
        group = []
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError as exc:
                refused(path, f"cannot read it: {exc.strerror or exc}")
                continue
            if not data:
                refused(path, "empty (0 bytes)")
                continue
            group.append((path, data))
        if group:
            send(group)
    if bad:
        fail(f"{bad} of {len(files)} files were not submitted", code=1)


def status(
    address: Optional[str] = typer.Option(None, "--address", help="Orchestrator host:port."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    watch: bool = typer.Option(False, "--watch", "-w", help="A live view, refreshed until Ctrl-C."),
    interval: float = typer.Option(2.0, "--interval", min=0.1, help="Seconds between refreshes of --watch."),
    count: int = typer.Option(0, "--count", min=0, help="With --watch: stop after this many refreshes (0: never)."),
) -> None:
    """Items per state and stage, queue depths (ready + unacknowledged), dead letters, the review
    queue and its oldest item's age, and the annotators' figures (items/hour, masks/hour, seconds
    per mask, audit agreement); ``--watch`` keeps it live with items settled per minute."""
    from services.common.pb import orchestrator_pb2, orchestrator_pb2_grpc
    from services.common.review import AnnotatorFigures
    from services.orchestrator.model import Stats
    from services.app.status_view import watch as watch_view

    settings = make_settings()
    stub = orchestrator_pb2_grpc.OrchestratorStub(_channel(settings, address))

    def fetch() -> Stats:
        return Stats.from_proto(_call(stub.Stats, orchestrator_pb2.StatsRequest()))

    if watch:
        if as_json:
            fail("--watch and --json do not go together: poll `status --json` from a script instead")
        watch_view(fetch, address or f"localhost:{settings.orchestrator_port}", stdout, interval, count)
        return
    stats = fetch()
    figures = _call(stub.AnnotatorStats, orchestrator_pb2.AnnotatorStatsRequest())
    annotators = [AnnotatorFigures.from_proto(f).to_json() for f in figures.annotators]
    if as_json:
        typer.echo(json.dumps({**stats.to_json(), "annotators": annotators}))
        return
    for title, counts in (("items by state", stats.by_state), ("items by stage", stats.by_stage),
                          ("queue depths", stats.queue_depths), ("review waiting", stats.review_waiting)):
        _table(title, counts)
    typer.echo(f"dead letters: {stats.dead_letters}")
    typer.echo(f"oldest unclaimed review item waiting: {stats.review_oldest_s:.0f} s")
    _annotators(annotators)


def _annotators(rows: list[dict]) -> None:
    table = Table(title="annotators")
    columns = ("annotator", "items", "masks", "items_per_hour", "masks_per_hour", "seconds_per_item",
               "seconds_per_mask", "audits", "audit_decision_agreement", "audit_mask_iou")
    for c in columns:
        table.add_column(c.replace("_", " "), justify="left" if c == "annotator" else "right")
    for row in rows:
        table.add_row(*("-" if row[c] is None else f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c])
                        for c in columns))
    stdout.print(table)


def export(
    fmt: str = typer.Argument(..., help="coco, sa1b or saco."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON file (coco, saco) or folder (sa1b); with "
                                       "--shards, the folder for the shards and index.json."),
    state: list[str] = typer.Option([], "--state", help="Export items in this state (repeat); "
                                    "default: accepted, review and rejected."),
    shards: Optional[int] = typer.Option(None, "--shards", help="Split into N shards by item id (sa1b: "
                                         "sa_000000.tar ..., coco/saco: one JSON each) plus index.json; "
                                         "resumable: run again to finish an interrupted export."),
    workers: int = typer.Option(1, "--workers", help="Processes writing shards at once (with --shards)."),
    to_store: Optional[str] = typer.Option(None, "--to-store", help="Write into the object store under this "
                                           "prefix below exports/ (e.g. exports/run1) instead of --out."),
    queue: bool = typer.Option(False, "--queue", help="With --to-store and --shards: one Celery task per shard "
                               "for the orchestrator workers (queue orchestrator); waits for them."),
) -> None:
    """Export the dataset from the object store (DATAENGINE_STORE settings), streaming; sharded and
    in parallel with --shards."""
    from services.common.storage import open_store
    from services.orchestrator import exports
    from services.orchestrator.model import ItemState

    if (out is None) == (to_store is None):
        fail("give one destination: --out PATH or --to-store PREFIX (under exports/)")
    if shards is not None and shards < 1:
        fail(f"--shards must be at least 1, got {shards}")
    if workers < 1:
        fail(f"--workers must be at least 1, got {workers}")
    if shards is None and (workers != 1 or queue):
        fail("--workers and --queue split the work by shard: give --shards N as well")
    if queue and to_store is None:
        fail("--queue sends the shards to workers that write into the object store: give --to-store PREFIX")
    settings = make_settings()
    try:
        states = {ItemState.parse(s) for s in state} or exports.DATASET_STATES
        if shards is not None:
            result = _export_shards(settings, fmt, states, shards, workers, out, to_store, queue)
        elif out is not None:
            result = exports.export(open_store(settings), fmt, out, states).to_json()
        else:
            keys, summary = exports.export_to_store(open_store(settings), fmt, to_store, states)
            result = {**summary.to_json(), "keys": len(keys)}
    except DataEngineError as exc:
        fail(str(exc), code=1)
    typer.echo(json.dumps(result))


def _export_shards(settings: Settings, fmt: str, states, shards: int, workers: int, out: Path | None,
                   to_store: str | None, queue: bool) -> dict:
    """A sharded export with a progress bar (shards done of N); the index's totals and where it is."""
    import functools

    from services.common.storage import open_store
    from services.orchestrator import shards as sharding

    export = sharding.ShardedExport.of(fmt, shards, states)
    target = sharding.FolderTarget(out) if out is not None else sharding.StoreTarget(to_store)
    written = []
    with progress() as bar:
        task = bar.add_task(f"export {export.fmt}: shards", total=export.shards)

        def on_shard(record, now: bool) -> None:
            written.append(now)
            bar.advance(task)

        if queue:
            from services.common.queues import create_celery
            from services.orchestrator.export_tasks import export_shards_queued

            index = export_shards_queued(
                create_celery(settings), open_store(settings), target, export, on_shard,
                on_sent=lambda n: console.print(f"sent {n} shard tasks to queue orchestrator; waiting (interrupted, "
                                                "they go on: run again to collect them)"))
        else:
            index = sharding.export_shards(functools.partial(open_store, settings), target, export, workers, on_shard)
    where = str(Path(out) / sharding.INDEX) if out is not None else target.key(sharding.INDEX)
    return {**{k: v for k, v in index.items() if k != "files"}, "index": where,
            "written": sum(written), "kept": len(written) - sum(written)}


def reconcile(
    workers: int = typer.Option(1, "--workers", help="Processes reading the manifests at once, each a share "
                                "of the items (by item-id shard)."),
) -> None:
    """Rebuild the Redis indices from the manifests in the object store and re-enqueue the pending
    steps of every unfinished item (after Redis lost its data). Steps still in flight may run
    twice; their outputs overwrite the same keys and their second report is ignored."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    if workers < 1:
        fail(f"--workers must be at least 1, got {workers}")
    settings = make_settings()
    try:
        orchestrator = _orchestrator(settings)
        if workers == 1:
            restarted = orchestrator.resume()
        else:
            orchestrator.index.clear()  # once, before the parts fill it
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                restarted = sum(pool.map(_reconcile_part, [(i, workers) for i in range(workers)]))
        by_state, _ = orchestrator.index.counts()
    except DataEngineError as exc:
        fail(str(exc), code=1)
    _table("items by state", by_state)
    typer.echo(f"re-enqueued {restarted} unfinished items")


def _orchestrator(settings: Settings):
    from services.app.serve import SERVICES

    return SERVICES["orchestrator"]().make_core(settings)


def _reconcile_part(part: tuple[int, int]) -> int:
    """One process of ``reconcile --workers K``: its share of the items, into the cleared index."""
    return _orchestrator(make_settings()).resume(part, clear=False)


def _table(title: str, counts: dict[str, int]) -> None:
    table = Table(title=title)
    table.add_column("key")
    table.add_column("count", justify="right")
    for key, count in sorted(counts.items()):
        table.add_row(key, str(count))
    stdout.print(table)


def register(app: typer.Typer) -> None:
    for command in (run, submit, status, export, reconcile, refresh):
        app.command()(command)
