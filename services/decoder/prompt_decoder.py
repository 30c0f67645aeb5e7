"""SAM's prompt encoder + mask decoder over one image embedding, for many prompts at once.

This is the one place the decoder network runs; Predict and automatic generation both call it.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam


class PromptDecoder:
    """Decode prompts against one embedding.

    features: 1xCx64x64 float32 image embedding on the model's device.
    Coordinates are in the encoder's input frame (after ResizeLongestSide), XY pixels.
    """

    def __init__(self, sam: Sam, features: torch.Tensor) -> None:
        self.sam = sam
        self.features = features
        self.image_pe = sam.prompt_encoder.get_dense_pe()

    @torch.inference_mode()
    def __call__(self, points: torch.Tensor | None, labels: torch.Tensor | None,
                 boxes: torch.Tensor | None = None, mask_input: torch.Tensor | None = None,
                 multimask_output: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """points: BxNx2 float, labels: BxN (1 fg, 0 bg), boxes: Bx4 XYXY, mask_input: Bx1x256x256 logits.

        Returns low-res logits BxMx256x256 and predicted IoU BxM (M = 3 with multimask, else 1).
        """
        sparse, dense = self.sam.prompt_encoder(
            points=(points, labels) if points is not None else None, boxes=boxes, masks=mask_input)
        return self.sam.mask_decoder(image_embeddings=self.features, image_pe=self.image_pe,
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=multimask_output)
