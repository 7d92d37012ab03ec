"""Tiny models built from a config with a fixed seed, saved with save_pretrained, for fast tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaModel,
)

VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
    + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    + [
        "the",
        "cat",
        "dog",
        "sat",
        "on",
        "mat",
        "hello",
        "world",
        "paris",
        "is",
        "capital",
        "of",
        "france",
        "what",
        "an",
        "and",
        "to",
        "in",
        "it",
        "?",
        ".",
        ",",
        "!",
    ]
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant{% endif %}"
)
TINY_ARCHS = ("llama", "gpt2", "bert", "roberta")


def _tokenizer(encoder: bool) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if encoder:
        from tokenizers import processors

        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(arch: str, folder: Path, *, num_layers: int = 4, seed: int = 0) -> Path:
    """Builds a tiny random model of one architecture into folder (idempotent)."""
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=64,
    )
    if arch == "llama":
        config = LlamaConfig(
            **common,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=5,
            eos_token_id=6,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(VOCAB),
            n_embd=32,
            n_layer=num_layers,
            n_head=4,
            n_positions=256,
            bos_token_id=5,
            eos_token_id=6,
            pad_token_id=0,
        )
        model = GPT2LMHeadModel(config)
    elif arch == "bert":
        config = BertConfig(**common, max_position_embeddings=128, pad_token_id=0)
        model = BertModel(config, add_pooling_layer=False)
    elif arch == "roberta":
        config = RobertaConfig(**common, max_position_embeddings=130, pad_token_id=0)
        model = RobertaModel(config, add_pooling_layer=False)
    else:
        raise ValueError(arch)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    _tokenizer(encoder=arch in ("bert", "roberta")).save_pretrained(folder)
    json.loads((folder / "config.json").read_text())
    return folder
