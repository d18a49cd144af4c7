"""Tokenizers and text encoders over the world's vocabulary, as real pipelines use them.

* :func:`clip_tokenizer`: a ``CLIPTokenizer`` (byte-level BPE, ``</w>`` word ends) whose merges
  build every world word into one token; any other word still tokenizes (into letters), as
  with a real CLIP tokenizer, and tiltgen refuses it for the built-in models before sampling.
* :func:`t5_tokenizer`: a ``T5TokenizerFast`` (unigram) with one piece per world word.
* :func:`clip_text_config` / :func:`t5_config`: tiny encoders (trained with the denoiser).
"""

from __future__ import annotations

from typing import Sequence

from ...world import MAX_CAPTION_WORDS, WORDS

LETTERS = "abcdefghijklmnopqrstuvwxyz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
#: CLIP token length: the longest caption, its start and end tokens, and some room.
CLIP_MAX_LENGTH = MAX_CAPTION_WORDS + 5
#: T5 tokens the built-in flow model is sampled with by tiltgen (the pipeline's own default is
#: 256; the model is trained with both lengths, see recipes/flow.py).
T5_MAX_LENGTH = 24


def _bpe(word: Sequence[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word's symbols with merge ``ranks`` (lowest rank first)."""
    parts = list(word)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        ranked = [(r, i) for r, i in pairs if r is not None]
        if not ranked:
            break
        best = min(r for r, _ in ranked)
        pair = next((parts[i], parts[i + 1]) for r, i in ranked if r == best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def _symbols(word: str) -> list[str]:
    return list(word[:-1]) + [word[-1] + "</w>"]


def word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges under which every word of ``words`` is a single token.

    Grown to a fixed point: while some word still splits, append the merge of its first two
    symbols. A merge appended last applies only after every earlier one, so segmentations only
    coarsen and the loop ends."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for w in words:
            parts = _bpe(_symbols(w), ranks)
            if len(parts) > 1:
                pair = (parts[0], parts[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                changed = True
    return merges


def clip_vocab_and_merges(words: Sequence[str] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = word_merges(words)
    tokens = list(LETTERS) + [c + "</w>" for c in LETTERS] + ["".join(m) for m in merges]
    vocab: dict[str, int] = {}
    for t in tokens + [BOS, EOS]:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def clip_tokenizer(max_length: int = CLIP_MAX_LENGTH):
    """A ``CLIPTokenizer`` in which each world word is one token (padding with the end token)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, bos_token=BOS, eos_token=EOS,
                         pad_token=EOS, unk_token=EOS)


def t5_tokenizer(max_length: int = 256):
    """A ``T5TokenizerFast`` with one unigram piece per world word (letters as a fallback)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, 0.0) for w in WORDS] + [("\u2581", -5.0)] + [(c, -10.0) for c in LETTERS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)


def clip_text_config(vocab_size: int, hidden: int, layers: int = 2, projection: int | None = None,
                     max_length: int = CLIP_MAX_LENGTH):
    """A small CLIP text transformer; pooled output at the end token (``eos_token_id``)."""
    from transformers import CLIPTextConfig

    bos, eos = vocab_size - 2, vocab_size - 1
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=max_length,
                          projection_dim=projection or hidden, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)


def t5_config(vocab_size: int, d_model: int = 64, layers: int = 1):
    """A small T5 encoder; ``layers=0`` leaves the layer-normed token embeddings, each word's
    vector independent of the others."""
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=layers, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
