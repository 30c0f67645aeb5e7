"""Tiny, randomly initialised open-vocabulary detection / segmentation models for tests.

Each ``save_tiny_*`` function builds a model and its processor entirely offline
(no Hugging Face hub access: the tokenizers are built from small in-memory
vocabularies) and writes both with ``save_pretrained`` into ``folder``, so that
``AutoProcessor.from_pretrained(folder)`` and ``<ModelClass>.from_pretrained(folder)``
work later without network access.

The weights are random, so the predictions are meaningless; the models only
reproduce the real architectures, input conventions and output formats:

* ``save_tiny_sam3``: ``Sam3Model`` + ``Sam3Processor`` (text prompt -> instance masks,
  boxes, scores), 112x112 input.
* ``save_tiny_grounding_dino``: ``GroundingDinoForObjectDetection`` +
  ``GroundingDinoProcessor`` (text "dog. cat." -> boxes, scores, phrases), shortest edge 64.
* ``save_tiny_owlv2``: ``Owlv2ForObjectDetection`` + ``Owlv2Processor``
  (text queries [["dog", "cat"]] -> boxes, scores, query indices), 64x64 input.

Loading plus one forward pass takes well under a second on one CPU thread. On a CPU
that other processes keep busy, call ``torch.set_num_threads(1)``: with several
threads these tiny ops can slow down ~100x (thread spin-waiting).
"""

from __future__ import annotations

from pathlib import Path

# Words every tiny vocabulary holds as one token (the tests prompt with these). Other text
# still encodes: CLIP (SAM 3, OWLv2) falls back to byte-level pieces and never yields an
# unknown token; BERT (Grounding DINO) maps an unknown word to [UNK].
WORDS = (
    "a",
    "an",
    "the",
    "of",
    "and",
    "dog",
    "cat",
    "car",
    "red",
    "blue",
    "person",
    "photo",
    "visual",  # Sam3Processor's default text when only boxes are given
)

_SEED = 0


def _byte_level_alphabet() -> list[str]:
    """GPT-2 / CLIP ``bytes_to_unicode`` symbols, in CLIP's vocabulary order ("!" first)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(161, 173)) + list(range(174, 256))
    code_points = printable[:]
    others = [b for b in range(256) if b not in printable]  # mapped to 256, 257, ...
    code_points += [256 + i for i in range(len(others))]
    return [chr(c) for c in code_points]


def _clip_tokenizer(model_max_length: int, pad_token: str):
    """A tiny byte-level BPE tokenizer with the real ``CLIPTokenizer`` pipeline.

    Like CLIP's real vocabulary, it starts with the 256 byte-level symbols (GPT-2's
    byte-to-unicode table, so "!" is id 0), then the same 256 with the end-of-word
    suffix "</w>" (so any text encodes and nothing is ever unknown), then the merges
    that spell every word in ``WORDS`` as one token, and, as the two highest ids,
    ``<|startoftext|>`` (bos) and ``<|endoftext|>`` (eos, also the declared unknown
    token, as in CLIP). Keeping eos the highest id matters: OWLv2's text tower pools
    at ``input_ids.argmax(-1)``.
    """
    from transformers import CLIPTokenizer

    suffix = "</w>"
    alphabet = _byte_level_alphabet()
    tokens: list[str] = alphabet + [ch + suffix for ch in alphabet]
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        prefix = word[0]
        for i, ch in enumerate(word[1:], start=1):
            last = i == len(word) - 1
            right = ch + suffix if last else ch
            merged = prefix + right
            merge = (prefix, right)
            if merge not in merges:
                merges.append(merge)
            if merged not in tokens:
                tokens.append(merged)
            prefix = prefix + ch
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


def _bert_tokenizer(model_max_length: int):
    """A tiny WordPiece tokenizer with the real ``BertTokenizer`` pipeline.

    Grounding DINO hard-codes the ids of bert-base-uncased's [CLS]=101, [SEP]=102,
    "."=1012 and "?"=1029 (``SPECIAL_TOKENS`` in modeling_grounding_dino.py) to cut
    the prompt into phrases, so the tiny vocabulary keeps exactly those ids:
    [PAD]=0, [unusedN] fillers, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103,
    "."=1012, "?"=1029, then the words of ``WORDS`` from id 1030 on.
    """
    from transformers import BertTokenizer

    fixed = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".", 1029: "?"}
    size = 1030
    tokens = [fixed.get(i, f"[unused{i}]") for i in range(size)]
    tokens += [w for w in WORDS if w not in tokens]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=model_max_length)


def _prepare(folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_tiny_sam3(folder: Path) -> Path:
    """Save a tiny random ``Sam3Model`` + ``Sam3Processor`` into ``folder``; return ``folder``.

    Input 112x112 (ViT patch 14 -> 8x8 grid; layer 0 windowed (window 4), layer 1 global),
    FPN scales [2, 1, 0.5] (the DETR encoder sees the 8x8 level, masks come out at 16x16),
    10 queries, CLIP text tower of 1 layer / width 32 with 32 positions (the processor
    always pads text to 32 tokens).
    """
    import torch
    from transformers import (
        Sam3Config,
        Sam3ImageProcessor,
        Sam3Model,
        Sam3Processor,
    )
    from transformers.models.sam3.configuration_sam3 import (
        Sam3DETRDecoderConfig,
        Sam3DETREncoderConfig,
        Sam3GeometryEncoderConfig,
        Sam3MaskDecoderConfig,
        Sam3VisionConfig,
        Sam3ViTConfig,
    )

    folder = _prepare(folder)
    image_size, hidden, heads, ffn = 112, 32, 4, 64
    tokenizer = _clip_tokenizer(model_max_length=32, pad_token="<|endoftext|>")

    backbone_config = Sam3ViTConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=2,
        num_attention_heads=heads,
        image_size=image_size,
        pretrain_image_size=image_size,
        patch_size=14,
        window_size=4,
        global_attn_indexes=[1],
    )
    vision_config = Sam3VisionConfig(
        backbone_config=backbone_config,
        fpn_hidden_size=hidden,
        scale_factors=[2.0, 1.0, 0.5],
        backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
    )
    text_config = {
        "model_type": "clip_text_model",
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "projection_dim": hidden,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "max_position_embeddings": 32,
        "hidden_act": "gelu",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Sam3Config(
        vision_config=vision_config,
        text_config=text_config,
        geometry_encoder_config=Sam3GeometryEncoderConfig(
            hidden_size=hidden, num_layers=1, num_attention_heads=heads, intermediate_size=ffn
        ),
        detr_encoder_config=Sam3DETREncoderConfig(
            hidden_size=hidden, num_layers=1, num_attention_heads=heads, intermediate_size=ffn
        ),
        detr_decoder_config=Sam3DETRDecoderConfig(
            hidden_size=hidden, num_layers=1, num_queries=10, num_attention_heads=heads, intermediate_size=ffn
        ),
        # 2 FPN levels reach the mask decoder (scales 2 and 1), so 1 upsampling stage is used
        mask_decoder_config=Sam3MaskDecoderConfig(
            hidden_size=hidden, num_upsampling_stages=1, num_attention_heads=heads
        ),
    )
    torch.manual_seed(_SEED)
    model = Sam3Model(config).eval()

    image_processor = Sam3ImageProcessor(
        size={"height": image_size, "width": image_size},
        mask_size={"height": 16, "width": 16},
    )
    processor = Sam3Processor(image_processor=image_processor, tokenizer=tokenizer, target_size=image_size)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_grounding_dino(folder: Path) -> Path:
    """Save a tiny random ``GroundingDinoForObjectDetection`` + ``GroundingDinoProcessor``.

    Swin backbone (embed_dim 8, depth 1 per stage, stages 2-4 used, +1 extra conv level
    = 4 feature levels), d_model 32, 1 encoder / 2 decoder layers, 10 queries,
    BERT text tower of 1 layer / width 16, max_text_len 32; images resized to
    shortest edge 64 / longest edge 128. Returns ``folder``.
    """
    import torch
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    folder = _prepare(folder)
    max_text_len = 32
    tokenizer = _bert_tokenizer(model_max_length=max_text_len)

    backbone_config = SwinConfig(
        image_size=64,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=7,
        out_indices=[2, 3, 4],
    )
    text_config = {
        "model_type": "bert",
        "vocab_size": len(tokenizer),
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 64,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = GroundingDinoConfig(
        backbone_config=backbone_config,
        text_config=text_config,
        d_model=32,
        encoder_layers=1,
        # 2, not 1: with decoder_bbox_embed_share=True (the default, as in the real checkpoints)
        # and a single decoder layer, post_init's weight-tying check raises (nothing to tie).
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=10,
        num_feature_levels=4,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=max_text_len,
    )
    torch.manual_seed(_SEED)
    model = GroundingDinoForObjectDetection(config).eval()

    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_owlv2(folder: Path) -> Path:
    """Save a tiny random ``Owlv2ForObjectDetection`` + ``Owlv2Processor`` into ``folder``.

    Vision ViT 64x64 input, patch 8 (8x8 = 64 predicted boxes), width 32, 1 layer;
    CLIP text tower width 32, 1 layer, 16 positions (the processor pads every query to
    16 tokens). The image processor pads to a square (bottom/right) and resizes to 64x64.
    Returns ``folder``.
    """
    import torch
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    folder = _prepare(folder)
    image_size = 64
    tokenizer = _clip_tokenizer(model_max_length=16, pad_token="!")
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "max_position_embeddings": 16,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": 8,
    }
    config = Owlv2Config(text_config=text_config, vision_config=vision_config, projection_dim=32)
    torch.manual_seed(_SEED)
    model = Owlv2ForObjectDetection(config).eval()
    # Random box-head weights saturate the box sigmoid (every box a corner of the padded square);
    # zeroed, each patch predicts its own anchor box, spread over the image as a trained model's.
    with torch.no_grad():
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()

    image_processor = Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
    processor = Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


__all__ = ["save_tiny_sam3", "save_tiny_grounding_dino", "save_tiny_owlv2"]
