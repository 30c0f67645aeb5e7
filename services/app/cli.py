"""The ``dataengine`` command line: thin commands over the same core code the services run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from services.app.cli_common import collect_images, fail as _fail, progress as _progress, settings as _settings
from services.common.errors import DataEngineError
from services.app import (calibrate_command, concepts_commands, engine_commands, eval_commands, mining_command,
                      model_commands, studio_commands, train_commands)


class _Commands(TyperGroup):
    """``eval masks`` and ``eval routing`` are ``eval-masks`` and ``eval-routing``: ``eval`` itself
    takes ground-truth files as arguments, so it cannot also be a group of subcommands."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if len(args) >= 2 and args[0] == "eval" and args[1] in ("masks", "routing"):
            args = [f"eval-{args[1]}", *args[2:]]
        return super().parse_args(ctx, args)


app = typer.Typer(help="dataengine: raw images to verified segmentation datasets.", no_args_is_help=True,
                  pretty_exceptions_enable=False, cls=_Commands)
models_app = typer.Typer(help="SAM checkpoints.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@app.command()
def masks(
    images: list[Path] = typer.Argument(..., help="Image files or folders."),
    out: Path = typer.Option(..., "--out", help="Folder for one SA-1B JSON per image (<stem>.json)."),
    model_type: str = typer.Option("vit_b", "--model-type", help="vit_h, vit_l, vit_b or tiny."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="SAM checkpoint (.pth)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N."),
    points_per_side: int = typer.Option(32, "--points-per-side"),
    points_per_batch: int = typer.Option(64, "--points-per-batch"),
    pred_iou_thresh: float = typer.Option(0.88, "--pred-iou-thresh"),
    stability_score_thresh: float = typer.Option(0.95, "--stability-score-thresh"),
    stability_score_offset: float = typer.Option(1.0, "--stability-score-offset"),
    box_nms_thresh: float = typer.Option(0.7, "--box-nms-thresh"),
    crop_n_layers: int = typer.Option(0, "--crop-n-layers"),
    crop_nms_thresh: float = typer.Option(0.7, "--crop-nms-thresh"),
    crop_overlap_ratio: float = typer.Option(512 / 1500, "--crop-overlap-ratio"),
    crop_n_points_downscale_factor: int = typer.Option(1, "--crop-n-points-downscale-factor"),
    min_mask_region_area: int = typer.Option(0, "--min-mask-region-area"),
) -> None:
    """Automatic mask generation (as segment-anything's scripts/amg.py), one SA-1B JSON per image."""
    from services.common.amg_params import AmgParams
    from services.app.pipeline import MaskPipeline

    try:
        params = AmgParams(
            points_per_side=points_per_side, points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset, box_nms_thresh=box_nms_thresh,
            crop_n_layers=crop_n_layers, crop_nms_thresh=crop_nms_thresh,
            crop_overlap_ratio=crop_overlap_ratio,
            crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            min_mask_region_area=min_mask_region_area)
    except (DataEngineError, ValueError) as exc:
        _fail(str(exc))
    settings = _settings(model_type=model_type, checkpoint=checkpoint, device=device)
    # Inputs are checked before the model loads: a typo should not cost a checkpoint load.
    files = collect_images(images)
    if not files:
        _fail("no image files found in " + ", ".join(map(str, images)))
    try:
        pipeline = MaskPipeline.from_settings(settings)
    except (DataEngineError, ValueError) as exc:
        _fail(str(exc), code=1)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    with _progress() as progress:
        task = progress.add_task("masks", total=len(files))
        for path in files:
            try:
                doc = pipeline.generate_file(path, params)
                (out / f"{path.stem}.json").write_text(json.dumps(doc))
                progress.console.print(f"{path}: {len(doc['annotations'])} masks")
            except DataEngineError as exc:
                failed += 1
                progress.console.print(f"[red]{path}: {exc}[/red]")
            progress.advance(task)
    if failed:
        _fail(f"{failed} of {len(files)} images failed", code=1)


@models_app.command("fetch")
def models_fetch(
    name: str = typer.Argument(..., help="vit_h, vit_l or vit_b."),
    dest: Optional[Path] = typer.Option(None, "--dest", help="Folder (default: DATAENGINE_MODELS_DIR)."),
) -> None:
    """Download an official SAM checkpoint from its published URL and check its SHA-256."""
    from services.embedder.weights import fetch_checkpoint

    folder = (dest or _settings().models_dir).expanduser()
    try:
        path = fetch_checkpoint(name, folder)
    except (DataEngineError, ValueError) as exc:
        _fail(str(exc), code=1)
    typer.echo(str(path))


@app.command()
def serve(
    service: str = typer.Argument(..., help="embedder, decoder, concepts, verifier, orchestrator or studio."),
    grpc_server: bool = typer.Option(True, "--grpc/--no-grpc", help="Run the gRPC server."),
    worker: bool = typer.Option(True, "--worker/--no-worker", help="Run the Celery worker."),
) -> None:
    """Start SERVICE's gRPC server and its Celery worker (queue SERVICE) until SIGTERM; the studio:
    its HTTP server (DATAENGINE_STUDIO_PORT) over the orchestrator and decoder named by
    DATAENGINE_ORCHESTRATOR_ADDRESS and DATAENGINE_DECODER_ADDRESS."""
    from services.app.serve import SERVICES, run_service

    if service == "studio":
        from services.app.serve import open_tokens
        from services.studio.server import grpc_backend, serve as serve_studio

        settings = _settings()
        try:
            serve_studio(grpc_backend(settings), settings, tokens=open_tokens(settings))
        except (DataEngineError, ValueError) as exc:
            _fail(str(exc), code=1)
        return
    if service not in SERVICES:
        _fail(f"unknown service {service!r}; choose one of {', '.join(SERVICES)} or studio")
    try:
        run_service(service, _settings(), grpc_server=grpc_server, worker=worker)
    except (DataEngineError, ValueError) as exc:
        _fail(str(exc), code=1)


engine_commands.register(app)
concepts_commands.register(app)
calibrate_command.register(app)
eval_commands.register(app)
studio_commands.register(app)
train_commands.register(app)
model_commands.register(app, models_app)
mining_command.register(app)

if __name__ == "__main__":
    app()
