"""A character-level tokenizer in Hugging Face format, so tiny and real models share the AutoTokenizer path."""

from __future__ import annotations

import os
import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
# Every printable ASCII character and newline: enough for the built-in tasks' prompts and a chat template.
DEFAULT_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"
# Plain-text roles; only characters of the default alphabet, so templated prompts stay in-vocabulary.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


# The prompt exactly as a task renders it (the contents, no roles): what the warm-up and RL train a tiny policy on,
# so that `apply_chat_template` on an exported policy gives it the text it was trained with.
RAW_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def char_tokenizer(
    alphabet: str = DEFAULT_ALPHABET, *, chat_template: str | None = CHAT_TEMPLATE
) -> PreTrainedTokenizerFast:
    """One token per character of ``alphabet`` plus ``<pad>`` (id 0), ``<s>``, ``</s>`` (eos) and ``<unk>``.

    A byte-pair model with no merges over the single characters: every character becomes its own token, unknown
    characters become ``<unk>``, and decoding concatenates. No BOS/EOS is added by ``encode``.
    """
    chars = list(dict.fromkeys(alphabet))
    if not chars:
        raise ValueError("alphabet must contain at least one character, got ''")
    clash = [c for c in chars if c in SPECIAL_TOKENS]
    if clash:
        raise ValueError(f"alphabet must not contain special tokens, got {clash}")
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *chars))}
    model = models.BPE(vocab=vocab, merges=[], unk_token="<unk>")
    tok = Tokenizer(model)
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=chat_template,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def save_char_tokenizer(path: str | os.PathLike, alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """Builds ``char_tokenizer(alphabet)`` and saves it with ``save_pretrained(path)`` (loadable with
    ``AutoTokenizer.from_pretrained(path)``)."""
    tok = char_tokenizer(alphabet)
    tok.save_pretrained(os.fspath(path))
    return tok
