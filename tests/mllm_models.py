"""Tiny randomly initialised multimodal models, saved with ``save_pretrained`` for tests that load
them back through ``from_pretrained`` (the concepts and verifier ``transformers`` backends).

The family is Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration`` + ``Qwen2_5_VLProcessor``), the
family the concepts issue names. Everything is built offline:

- tokenizer: a byte-level BPE trained with the ``tokenizers`` library on a few prompt-like
  strings (every byte is in its alphabet, so any text encodes), plus Qwen's special tokens
  (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|image_pad|>``, ...), wrapped in
  ``PreTrainedTokenizerFast``;
- image processor: ``Qwen2VLImageProcessor`` with 8-pixel patches and images resized to at most
  32x32 pixels (4 patches after the 2x2 merge: a handful of image tokens);
- chat template: a Jinja string in Qwen's format (one ``<|vision_start|><|image_pad|><|vision_end|>``
  per image part);
- model: 2 text layers of width 64, 2 vision blocks of width 32 (~0.2 M parameters).

With random weights the answers are garbage; the output rows of the special tokens are zeroed so
the garbage is plain text that runs to ``max_new_tokens`` rather than stopping at once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# What the tokenizer learns merges from: the shapes of text the backends send and expect.
_CORPUS = [
    '{"phrases": [{"text": "yellow taxi", "box": [120, 340, 560, 720], "point": null, "score": 0.9}], '
    '"hard_negatives": [{"text": "yellow school bus", "reason": "model", "score": 0.8}]}',
    "List the noun phrases of the objects in this image and hard negatives. Answer with strict JSON only.",
    "A: accept B: reject C: flag label D: whole image E: reject. Answer with one letter.",
    "dog cat person car bus truck bicycle chair table bottle cup red blue green wooden striped",
]

PATCH, MERGE, MAX_PIXELS = 8, 2, 32 * 32


def _tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def save_tiny_qwen2_5_vl(directory: Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-VL and its processor to ``directory``; returns ``directory``.

    The same ``seed`` gives the same weights, so the garbage answers are reproducible.
    """
    tokenizer = _tokenizer()
    sizes = dict(min_pixels=16 * 16, max_pixels=MAX_PIXELS, patch_size=PATCH, temporal_patch_size=2,
                 merge_size=MERGE)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=CHAT_TEMPLATE)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            # multimodal RoPE: the (temporal, height, width) sections sum to head_dim / 2 = 8
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
                           window_size=PATCH * MERGE * 2, fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight[list(ids.values())] = 0.0
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
