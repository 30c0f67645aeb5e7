"""The SAM checkpoint a benchmark runs: the one given, else one of the official format with random
weights (the cost of a forward pass does not depend on the weights), built once and kept."""

from __future__ import annotations

from pathlib import Path

from services.common.sam_models import save_random_checkpoint


def bench_checkpoint(model_type: str, checkpoint: Path | None, work_dir: Path, seed: int = 0) -> Path:
    """``checkpoint``, or ``work_dir/sam_<type>_random.pth`` (written first if missing)."""
    if checkpoint is None:
        checkpoint = work_dir / f"sam_{model_type}_random.pth"
        if not checkpoint.is_file():
            print(f"building a random-weight {model_type} checkpoint at {checkpoint} ...", flush=True)
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            save_random_checkpoint(model_type, checkpoint, seed=seed)
    return checkpoint
