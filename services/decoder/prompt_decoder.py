"""SAM's prompt encoder + mask decoder over one image embedding, for many prompts at once.

This is the one place the decoder network runs; Predict and automatic generation both call it.

It computes what segment-anything's ``MaskDecoder`` computes, with the official modules' own
weights and layers, in an order that does less work on the CPU, where the 256-dim decoder is
bound by memory traffic over its BxHWxC image-side tensors:

- the image side is never copied per prompt (the official ``repeat_interleave``);
- without a mask input every prompt sees the same image side in the first two-way block, so
  keys + key_pe, the token->image k/v projections and the image->token q projection are computed
  once per embedding (and cached: an interactive session reuses them on every click);
- ``keys + key_pe`` is computed once per block instead of twice;
- the transformer and the mask upscaling are separate steps, so automatic generation can read
  the predicted IoU first and upscale only the prompts with a mask that passes its filter;
- the mask upscaling (two 2x2 transposed convolutions) runs as matrix products, channels last
  (``upscale_masks``);
- on CPU, prompts go through a few at a time (``CPU_CHUNK``) so the per-prompt image side stays
  in cache.

Every other operation is the official layer applied to the same values, so outputs match the
official modules to float32 rounding (summation order differs in the upscaling: about 1e-7 on
the logits; tests check 1e-4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.transformer import Attention


@dataclass
class DecodedTokens:
    """The two-way transformer's output for B prompts.

    tokens: BxTxC output tokens (IoU token, mask tokens, prompt tokens) after the final attention.
    image: BxHWxC image side after the last block (HW = 64*64); upscaled into the masks.
    """

    tokens: torch.Tensor
    image: torch.Tensor


CPU_CHUNK = 4  # prompts per pass on CPU, see PromptDecoder._chunk


class PromptDecoder:
    """Decode prompts against one embedding.

    features: 1xCx64x64 float32 image embedding on the model's device.
    Coordinates are in the encoder's input frame (after ResizeLongestSide), XY pixels.
    """

    def __init__(self, sam: Sam, features: torch.Tensor) -> None:
        self.sam = sam
        self.features = features
        self.image_pe = sam.prompt_encoder.get_dense_pe()
        self._shared: tuple[torch.Tensor, ...] | None = None  # first-block image side, no mask input
        _check_upscaling(sam.mask_decoder.output_upscaling)

    @torch.inference_mode()
    def __call__(self, points: torch.Tensor | None, labels: torch.Tensor | None,
                 boxes: torch.Tensor | None = None, mask_input: torch.Tensor | None = None,
                 multimask_output: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """points: BxNx2 float, labels: BxN (1 fg, 0 bg), boxes: Bx4 XYXY, mask_input: Bx1x256x256 logits.

        Returns low-res logits BxMx256x256 and predicted IoU BxM (M = 3 with multimask, else 1).
        """
        decoded = self.transform(points, labels, boxes, mask_input)
        return self.masks(decoded, multimask_output), self.iou(decoded, multimask_output)

    # -- the three steps -------------------------------------------------------------------------

    @torch.inference_mode()
    def transform(self, points: torch.Tensor | None, labels: torch.Tensor | None,
                  boxes: torch.Tensor | None = None,
                  mask_input: torch.Tensor | None = None) -> DecodedTokens:
        """Prompt encoder + two-way transformer (same inputs as ``__call__``)."""
        inputs = (points, labels, boxes, mask_input)
        n = next(t.shape[0] for t in inputs if t is not None)
        step = self._chunk(n)
        if step >= n:
            return self._transform(*inputs)
        parts = [self._transform(*(None if t is None else t[i:i + step] for t in inputs))
                 for i in range(0, n, step)]
        return DecodedTokens(torch.cat([p.tokens for p in parts]), torch.cat([p.image for p in parts]))

    def _chunk(self, n: int) -> int:
        """Prompts per pass. On CPU the decoder is bound by memory traffic over its BxHWxC image
        side (4 MiB a prompt): a few prompts at a time stay in cache and run 2-3x faster per
        prompt than one pass over a batch of 64 (bench/bench_amg.py). GPUs want the whole batch."""
        return CPU_CHUNK if self.features.device.type == "cpu" else max(n, 1)

    def _transform(self, points: torch.Tensor | None, labels: torch.Tensor | None,
                   boxes: torch.Tensor | None, mask_input: torch.Tensor | None) -> DecodedTokens:
        sam = self.sam
        sparse, dense = sam.prompt_encoder(
            points=(points, labels) if points is not None else None, boxes=boxes, masks=mask_input)
        decoder = sam.mask_decoder
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
        pe = self._image_pe_seq()
        if mask_input is None:
            queries, keys = self._first_block_shared(tokens)
            layers = decoder.transformer.layers[1:]
        else:
            # Dense prompts differ per prompt: the image side is per prompt from the start.
            keys = (self.features + dense).flatten(2).transpose(1, 2)
            queries, layers = tokens, decoder.transformer.layers
        for layer in layers:
            queries, keys = _two_way_block(layer, queries, keys, tokens, pe)
        transformer = decoder.transformer
        attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + pe, v=keys)
        queries = transformer.norm_final_attn(queries + attn_out)
        return DecodedTokens(queries, keys)

    @torch.inference_mode()
    def iou(self, decoded: DecodedTokens, multimask_output: bool = True) -> torch.Tensor:
        """Predicted IoU, BxM."""
        iou = self.sam.mask_decoder.iou_prediction_head(decoded.tokens[:, 0, :])
        return iou[:, _mask_slice(multimask_output)]

    @torch.inference_mode()
    def masks(self, decoded: DecodedTokens, multimask_output: bool = True,
              rows: torch.Tensor | None = None) -> torch.Tensor:
        """Low-res mask logits, BxMx256x256, or only for the prompts at ``rows`` (R-long 1-D index):
        RxMx256x256. The upscaling is the costly half of the decoder; it runs for those rows only.
        """
        decoder = self.sam.mask_decoder
        mask_tokens = decoded.tokens[:, 1:1 + decoder.num_mask_tokens, :]
        # The hypernetworks run on all B prompts, all rows, as in the official decoder: a linear
        # layer's float rounding can depend on how many rows it multiplies at once, and these are
        # cheap (B x 256 each), so only the image-sized upscaling is restricted to ``rows``.
        hyper_in = torch.stack([mlp(mask_tokens[:, i, :])
                                for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
        hyper_in = hyper_in[:, _mask_slice(multimask_output)]  # only the masks returned
        image = decoded.image
        if rows is not None:
            hyper_in, image = hyper_in[rows], image[rows]
        step = self._chunk(len(image))
        return torch.cat([upscale_masks(decoder.output_upscaling, image[i:i + step], hyper_in[i:i + step])
                          for i in range(0, len(image), step)])

    # -- internals -------------------------------------------------------------------------------

    def _image_pe_seq(self) -> torch.Tensor:
        return self.image_pe.flatten(2).transpose(1, 2)  # 1xHWxC view

    def _shared_image_side(self) -> tuple[torch.Tensor, ...]:
        """(src, k, v, q): 1xHWxC image side without mask input, and the first block's projections
        that depend on it alone. Computed once per embedding."""
        if self._shared is None:
            sam = self.sam
            no_mask = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            src = (self.features + no_mask).flatten(2).transpose(1, 2).contiguous()
            key_in = src + self._image_pe_seq()
            first = sam.mask_decoder.transformer.layers[0]
            t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
            self._shared = (src, t2i.k_proj(key_in), t2i.v_proj(src), i2t.q_proj(key_in))
        return self._shared

    def _first_block_shared(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first TwoWayAttentionBlock with its image-side terms shared by all prompts."""
        layer = self.sam.mask_decoder.transformer.layers[0]
        src, k_img, v_img, q_img = self._shared_image_side()
        queries = tokens
        if layer.skip_first_layer_pe:
            queries = layer.norm1(layer.self_attn(q=queries, k=queries, v=queries))
        else:
            queries = layer.norm1(queries + layer.self_attn(q=queries + tokens, k=queries + tokens, v=queries))
        attn_out = _attend_shared_kv(layer.cross_attn_token_to_image, queries + tokens, k_img, v_img)
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + tokens
        attn_out = _attend_shared_q(layer.cross_attn_image_to_token, q_img, q, queries)
        keys = layer.norm4(src + attn_out)
        return queries, keys


def upscale_masks(upscaling: torch.nn.Sequential, image: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
    """SAM's ``output_upscaling`` followed by the hypernetwork product, channels last.

    image: BxHWxC image side (HW = side*side); hyper_in: BxMxC2 hypernetwork outputs.
    Returns BxMx(4 side)x(4 side) mask logits.

    A 2x2, stride-2 transposed convolution maps each input pixel to its own 2x2 output block, so
    it is one matrix product (pixels x Cin) @ (Cin x 4 Cout). Kept channels last, LayerNorm2d is a
    plain layer norm over the last axis and the 32-channel upscaled image is never permuted to
    NCHW: only the M mask channels are. On CPU this is several times faster than the official
    ConvTranspose2d path (whose oneDNN kernels and NCHW copies dominate a single-prompt decode);
    the result equals it to float32 rounding (summation order differs).
    """
    conv1, norm, act1, conv2, act2 = upscaling
    b, hw, c = image.shape
    side = math.isqrt(hw)
    c1, c2 = conv1.out_channels, conv2.out_channels
    # weight: Cin x Cout x 2 x 2 -> Cin x (2 x 2 x Cout): output block position major, channel minor
    w1 = conv1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c1)
    # biases repeat per output block position; addmm adds them inside the matrix product
    x = torch.addmm(conv1.bias.repeat(4), image.reshape(b * hw, c), w1).view(b, hw * 4, c1)
    x = act1(torch.nn.functional.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
    w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
    x = act2(torch.addmm(conv2.bias.repeat(4), x.view(b * hw * 4, c1), w2).view(b, hw * 16, c2))
    masks = torch.bmm(x, hyper_in.transpose(1, 2))  # B x (HW * 16) x M
    m = masks.shape[-1]
    # rows of x: (h, w, di, dj, ei, ej); output pixel (4h + 2di + ei, 4w + 2dj + ej)
    masks = masks.view(b, side, side, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return masks.reshape(b, m, 4 * side, 4 * side)


def _check_upscaling(upscaling: torch.nn.Module) -> None:
    """``upscale_masks`` assumes the official layout: convT(2, 2), LayerNorm2d, act, convT(2, 2), act."""
    from segment_anything.modeling.common import LayerNorm2d

    layers = list(upscaling) if isinstance(upscaling, torch.nn.Sequential) else []
    ok = (len(layers) == 5 and isinstance(layers[1], LayerNorm2d)
          and all(isinstance(layers[i], torch.nn.ConvTranspose2d) and layers[i].kernel_size == (2, 2)
                  and layers[i].stride == (2, 2) and layers[i].padding == (0, 0) for i in (0, 3)))
    if not ok:
        raise ValueError(f"unsupported mask decoder output_upscaling: {upscaling}")


def _mask_slice(multimask_output: bool) -> slice:
    return slice(1, None) if multimask_output else slice(0, 1)


def _two_way_block(layer, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                   key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's TwoWayAttentionBlock.forward, with keys + key_pe computed once."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)
    key_in = keys + key_pe  # the same value in both cross attentions: keys change only at the end
    attn_out = layer.cross_attn_token_to_image(q=queries + query_pe, k=key_in, v=keys)
    queries = layer.norm2(queries + attn_out)
    queries = layer.norm3(queries + layer.mlp(queries))
    attn_out = layer.cross_attn_image_to_token(q=key_in, k=queries + query_pe, v=queries)
    keys = layer.norm4(keys + attn_out)
    return queries, keys


def _attend_shared_kv(attn: Attention, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of BxTxC tokens to one image side whose projections k, v (1xHWxCi) all share."""
    q = attn.q_proj(q_in)
    b, t, ci = q.shape
    heads, d = attn.num_heads, ci // attn.num_heads
    hw = k.shape[1]
    qh = q.reshape(b, t, heads, d).permute(2, 0, 1, 3).reshape(heads, b * t, d)
    kh = k[0].reshape(hw, heads, d).permute(1, 2, 0)  # heads x d x HW
    vh = v[0].reshape(hw, heads, d).transpose(0, 1)  # heads x HW x d
    weights = torch.softmax(torch.bmm(qh, kh) / math.sqrt(d), dim=-1)
    out = torch.bmm(weights, vh).reshape(heads, b, t, d).permute(1, 2, 0, 3).reshape(b, t, ci)
    return attn.out_proj(out)


def _attend_shared_q(attn: Attention, q: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
    """Attention of one image side (its q projection, 1xHWxCi, shared) to each prompt's BxTxC tokens.

    Returns BxHWxC.
    """
    k, v = attn.k_proj(k_in), attn.v_proj(v_in)
    b, t, ci = k.shape
    heads, d = attn.num_heads, ci // attn.num_heads
    hw = q.shape[1]
    qh = q[0].reshape(hw, heads, d).transpose(0, 1)  # heads x HW x d
    kh = k.reshape(b, t, heads, d).permute(2, 3, 0, 1).reshape(heads, d, b * t)
    weights = (torch.bmm(qh, kh) / math.sqrt(d)).view(heads, hw, b, t)
    weights = torch.softmax(weights, dim=-1).permute(2, 0, 1, 3)  # B x heads x HW x T
    vh = v.reshape(b, t, heads, d).transpose(1, 2)  # B x heads x T x d
    out = torch.matmul(weights, vh).transpose(1, 2).reshape(b, hw, ci)
    return attn.out_proj(out)
