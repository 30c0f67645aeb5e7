"""``dataengine studio OUT_DIR``: the annotators' page over a run's output, in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from services.app.cli_common import console, fail, settings as make_settings
from services.common.errors import DataEngineError


def studio(
    out_dir: Path = typer.Argument(..., help="The --out folder of dataengine run."),
    model_type: Optional[str] = typer.Option(None, "--model-type", help="The run's model: vit_h, vit_l, vit_b or tiny."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="The run's SAM checkpoint (.pth)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: Optional[int] = typer.Option(None, "--port", help="HTTP port (default DATAENGINE_STUDIO_PORT, 8080)."),
) -> None:
    """Review OUT_DIR's items in the browser (stages 1 and 2); then `dataengine refresh OUT_DIR`."""
    from services.studio.identity import Caller
    from services.studio.server import serve
    from services.app.studio_local import embedded_backend

    settings = make_settings(model_type=model_type, checkpoint=checkpoint, device=device)
    try:
        backend = embedded_backend(settings, out_dir)
    except (DataEngineError, ValueError, OSError) as exc:
        fail(str(exc), code=1)
    waiting = sum(backend.waiting(Caller("studio")).values())
    console.print(f"{waiting} items wait for a human; open http://{host}:{port or settings.studio_port}/ "
                  f"(Ctrl-C to stop, then: dataengine refresh {out_dir})")
    serve(backend, settings, host, port, tokens=None)  # one trusted machine: sign-in by name


def register(app: typer.Typer) -> None:
    app.command()(studio)
