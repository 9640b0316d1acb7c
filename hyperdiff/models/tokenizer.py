"""Offline CLIP-style tokenizer.

Contract: `build_tokenizer(words)` returns a `transformers.CLIPTokenizer` built with no download. It is a byte-level
BPE exactly like CLIP's: the vocabulary holds the 256 byte-level characters of GPT-2/CLIP `bytes_to_unicode`, each
plain and with the `</w>` end-of-word suffix, so *any* text tokenizes; then one token per learned merge; then
`<|startoftext|>` and `<|endoftext|>` (the last two ids; `<|endoftext|>` is also the pad and unknown token). The merges
are learned by the `tokenizers` library's `BpeTrainer` on `words` until every word of `words` is exactly one token.
Building is deterministic: the same `words` give the same ids. The result saves and loads with
`save_pretrained`/`from_pretrained`, alone or inside a diffusers pipeline folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

from hyperdiff.errors import HyperdiffError

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
SUFFIX = "</w>"

# The caption vocabulary of the SynthFaces world (scene words, attributes, glue words) plus the identifier "sks".
# A later issue may extend it; appending words keeps earlier words single tokens.
DEFAULT_WORDS: tuple[str, ...] = (
    # glue
    "a", "an", "the", "of", "on", "in", "with", "and", "at", "is", "wearing", "has", "no",
    # subjects
    "photo", "picture", "image", "portrait", "drawing", "cartoon", "face", "person", "man", "woman", "character", "sks",
    # scene and accessories
    "background", "hat", "cap", "glasses", "sunglasses", "scarf", "earrings", "beard", "mustache", "hair", "eyes",
    "skin", "mouth", "nose", "head", "plain", "striped", "dotted", "gradient", "light", "dark", "bright", "pale",
    "round", "square", "oval", "big", "small", "short", "long", "curly", "straight", "bald",
    # colours
    "red", "green", "blue", "yellow", "purple", "gray", "grey", "orange", "pink", "brown", "black", "white", "teal",
    # expressions
    "smiling", "neutral", "surprised", "sad", "angry", "frowning", "happy", "laughing", "winking", "sleepy",
    "expression",
    # views
    "close", "up", "left", "right", "front", "view", "looking", "facing", "tilted",
)

# CLIP's pre-tokenizer split (transformers `CLIPTokenizer`); a training word must be one such piece.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])


def check_words(words: Iterable[str]) -> list[str]:
    """Validate `words`; return them normalized and byte-level mapped, de-duplicated, in order."""
    if isinstance(words, str):
        raise HyperdiffError(f"`words` must be a sequence of words, not one string, got {words!r}")
    normalizer, pre = _normalizer(), _pre_tokenizer()
    out: list[str] = []
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise HyperdiffError(f"`words` entries must be non-empty strings, got {word!r}")
        pieces = pre.pre_tokenize_str(normalizer.normalize_str(word))
        if len(pieces) != 1:
            raise HyperdiffError(
                f"`words` entries must each be one word (letters only, or one digit/symbol run), got {word!r}"
            )
        if pieces[0][0] not in out:
            out.append(pieces[0][0])
    if not out:
        raise HyperdiffError("`words` must contain at least one word, got none")
    return out


def _learn_merges(byte_words: list[str]) -> list[tuple[str, str]]:
    """Run the `tokenizers` BPE trainer on the (already byte-level) words until each is one token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    longest = max(len(w) for w in byte_words)
    trainer = trainers.BpeTrainer(
        # The trainer breaks ties between equally frequent pairs by token id, and it numbers the symbols it meets
        # in hash-map order; listing every base symbol first pins their ids, so the merges are the same every run.
        special_tokens=alphabet + [c + SUFFIX for c in alphabet],
        # Room for every possible merge: the trainer stops early once no pair is left, i.e. each word is one token.
        vocab_size=2 * len(alphabet) + longest * len(byte_words) + 8,
        min_frequency=0,
        show_progress=False,
        initial_alphabet=alphabet,
        end_of_word_suffix=SUFFIX,
    )
    bpe = Tokenizer(models.BPE(end_of_word_suffix=SUFFIX))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # words are already normalized and byte-level mapped
    bpe.train_from_iterator(sorted(byte_words), trainer=trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def build_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77) -> CLIPTokenizer:
    """Build the offline byte-level CLIP tokenizer whose merges make each of `words` one token."""
    if not isinstance(model_max_length, int) or isinstance(model_max_length, bool) or model_max_length < 2:
        raise HyperdiffError(f"`model_max_length` must be an integer >= 2, got {model_max_length!r}")
    byte_words = check_words(words)
    merges = _learn_merges(byte_words)

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in alphabet + [c + SUFFIX for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    for word in byte_words:  # the promise of this module; cheap to keep honest
        ids = tokenizer.backend_tokenizer.model.tokenize(word)
        if len(ids) != 1:
            raise RuntimeError(f"BPE training left word {word!r} as {len(ids)} tokens")
    return tokenizer
