"""SAM variants: segment-anything's registry plus a ``tiny`` variant for tests, one loader.

Checkpoints are read with ``map_location`` always set (segment-anything's own builder calls
``torch.load`` without it, so we build the network empty and load the state dict ourselves).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                       TwoWayTransformer)

from services.common.errors import FailedPrecondition, InvalidInput
from services.common.model_card import read_card
from services.common.promotion import read_promoted


@dataclass(frozen=True)
class OfficialCheckpoint:
    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"
OFFICIAL_CHECKPOINTS: dict[str, OfficialCheckpoint] = {
    "vit_h": OfficialCheckpoint(_BASE + "sam_vit_h_4b8939.pth",
                                "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    "vit_l": OfficialCheckpoint(_BASE + "sam_vit_l_0b3195.pth",
                                "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_b": OfficialCheckpoint(_BASE + "sam_vit_b_01ec64.pth",
                                "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
}


def build_sam_tiny(checkpoint: str | None = None) -> Sam:
    """A SAM of the official layout but a few hundred thousand weights, for fast tests.

    Same classes and constants as ``segment_anything.build_sam`` (1024 input, 16 px patches,
    64x64 embedding grid); only widths and depths shrink. The embedding is 32x64x64.
    """
    if checkpoint is not None:
        raise ValueError("build_sam_tiny builds an empty network; load weights with load_sam")
    dim = 32
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=2, embed_dim=48, img_size=1024, mlp_ratio=2.0,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,), window_size=14, out_chans=dim),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(64, 64),
                                     input_image_size=(1024, 1024), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=64),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


# Every variant builds an empty network; weights always come through load_sam.
MODEL_BUILDERS = {
    "vit_h": sam_model_registry["vit_h"],
    "vit_l": sam_model_registry["vit_l"],
    "vit_b": sam_model_registry["vit_b"],
    "tiny": build_sam_tiny,
}


def file_sha256(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class LoadedSam:
    """A SAM on its device, in eval mode, and its two ids ("<type>-<12 hex of a sha256>").

    decoder_id: this checkpoint's own (its file's SHA-256): masks and logits are keyed by it.
    encoder_id: the image encoder's: embeddings are keyed and checked by it. An official (or any
        card-less) checkpoint's is its own; a decoder fine-tuned on a frozen encoder carries its
        base's in its model card, so the embeddings the base stored stay valid.
    """

    model: Sam
    model_type: str
    encoder_id: str
    decoder_id: str
    device: torch.device


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition(f"device {name!r} requested but CUDA is not available on this machine")
    return device


# The image encoder's patch-embedding width names the variant a state dict is of.
_EMBED_DIMS = {1280: "vit_h", 1024: "vit_l", 768: "vit_b", 48: "tiny"}
_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


def read_state_dict(path: Path, model_type: str, device: torch.device | str = "cpu") -> dict:
    """The SAM state dict in ``path``, checked to be one of ``model_type``; FailedPrecondition naming
    what is wrong: unreadable or truncated, not a SAM state dict, or another variant (weights
    missing or of another shape are named when the network loads it, in ``load_sam``)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise FailedPrecondition(f"{path} cannot be read as a PyTorch checkpoint (truncated or not one): "
                                 f"{str(exc)[:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FailedPrecondition(f"{path} is not a SAM state dict (it holds a {type(state).__name__} "
                                 "that is not a mapping of names to tensors)")
    if not all(any(k.startswith(part) for k in state) for part in _PARTS):
        raise FailedPrecondition(f"{path} is not a SAM state dict: it lacks image_encoder, prompt_encoder or "
                                 "mask_decoder weights")
    width = state.get("image_encoder.patch_embed.proj.weight")
    variant = _EMBED_DIMS.get(int(width.shape[0])) if width is not None and width.ndim else None
    if variant is not None and variant != model_type:
        raise FailedPrecondition(f"{path} is a {variant} checkpoint, not {model_type}: set the model type to "
                                 f"{variant} or give a {model_type} checkpoint")
    return state


def load_sam(model_type: str, checkpoint: Path | str, device: str = "cpu") -> LoadedSam:
    """Build ``model_type`` from the registry and load ``checkpoint`` (a state-dict file) onto ``device``."""
    if model_type not in MODEL_BUILDERS:
        raise InvalidInput(f"unknown SAM model type {model_type!r}; choose one of {sorted(MODEL_BUILDERS)}")
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        hint = ""
        if model_type in OFFICIAL_CHECKPOINTS:
            hint = f"; download it with `dataengine models fetch {model_type}`"
        raise FailedPrecondition(f"SAM checkpoint {path} not found{hint}")
    dev = resolve_device(device)
    state = read_state_dict(path, model_type, dev)  # before building: a vit_h network is 2.5 GB
    model = MODEL_BUILDERS[model_type]()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # missing, unexpected or other-shaped weights
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise FailedPrecondition(f"{path} is not a {model_type} SAM checkpoint: {' '.join(lines[:3])[:300]}") from None
    model.to(dev).eval()
    sha = file_sha256(path)
    own = f"{model_type}-{sha[:12]}"
    card = read_card(path)
    # A card counts only for the very file it describes (not one copied beside another checkpoint).
    encoder = card.encoder_id if card and card.checkpoint_sha256 == sha and card.model_type == model_type else own
    return LoadedSam(model=model, model_type=model_type, encoder_id=encoder, decoder_id=own, device=dev)


def save_random_checkpoint(model_type: str, path: Path, seed: int = 0) -> Path:
    """Write a checkpoint of ``model_type``'s exact format with random weights (tests, benchmarks)."""
    torch.manual_seed(seed)
    model = MODEL_BUILDERS[model_type]()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def checkpoint_path(model_type: str, checkpoint: Path | None, models_dir: Path) -> Path:
    """The checkpoint to load: the one given, else the promoted one of ``models_dir``
    (``dataengine models promote``), else the official file in ``models_dir``."""
    if checkpoint is not None:
        return Path(checkpoint).expanduser()
    promoted = read_promoted(models_dir, model_type)
    if promoted is not None:
        return promoted[1]
    if model_type not in OFFICIAL_CHECKPOINTS:
        raise FailedPrecondition(f"model type {model_type!r} has no official checkpoint; give one by path")
    return Path(models_dir).expanduser() / OFFICIAL_CHECKPOINTS[model_type].filename


def load_from_settings(settings) -> LoadedSam:
    """``load_sam`` with the model type, checkpoint and device of ``settings``."""
    return load_sam(settings.model_type,
                    checkpoint_path(settings.model_type, settings.checkpoint, settings.models_dir),
                    settings.device)
