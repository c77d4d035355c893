"""A word tokenizer built from the training captions.

Shape legend: N prompts, L = max_len tokens per prompt, V vocabulary size (padding included).

    words(prompt) = prompt.lower().split()
    ids[n, l]     = vocab.index(words(prompt_n)[l])  for l < len(words),  0 (padding) after

The vocabulary is ["<pad>", *sorted distinct caption words]: id 0 is padding, so the empty prompt
"" encodes to all zeros, which is the unconditional prompt of classifier-free guidance. A word that
is not in the vocabulary is an error (the model has no embedding for it), never silently dropped.
"""

from __future__ import annotations

import numpy as np

PAD = "<pad>"


def short(text, n: int = 60) -> str:
    """repr(text), cut to about n characters (an error line quotes a prompt, never megabytes of it)."""
    r = repr(text)
    return r if len(r) <= n else r[:n] + f"...' ({len(text)} characters)"


def split_words(prompt) -> list[str]:
    """words(prompt) = prompt.lower().split()."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
    return prompt.lower().split()


class Tokenizer:
    """vocab[i] is the word of id i; vocab[0] == "<pad>". max_len is the default encode length."""

    def __init__(self, vocab, max_len: int):
        vocab = list(vocab)
        if not vocab or vocab[0] != PAD:
            raise ValueError(f"vocab must start with the padding token {PAD!r}, got {vocab[:3]!r}")
        for w in vocab[1:]:
            if not isinstance(w, str) or w != w.lower() or len(w.split()) != 1 or w == PAD:
                raise ValueError(f"vocab words must be lowercase strings without spaces, got {w!r}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab must not repeat a word")
        if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        self.vocab = vocab
        self.max_len = int(max_len)
        self.ids = {w: i for i, w in enumerate(vocab)}  # word -> id

    @classmethod
    def from_captions(cls, captions, max_len: int | None = None) -> Tokenizer:
        """Vocabulary = sorted distinct words of the captions; max_len defaults to the longest caption."""
        words = [split_words(c) for c in captions]
        if not any(words):
            raise ValueError("captions must hold at least one word to build a tokenizer from")
        vocab = [PAD] + sorted({w for ws in words for w in ws} - {PAD})
        longest = max(range(len(words)), key=lambda i: len(words[i]))
        if max_len is not None and len(words[longest]) > max_len:  # every caption is encoded in training
            raise ValueError(f"the caption {short(captions[longest])} has {len(words[longest])} words but the "
                             f"prompts hold {max_len} (--max-prompt-len); raise it to {len(words[longest])} or "
                             "shorten the class names")
        return cls(vocab, len(words[longest]) if max_len is None else max_len)

    @property
    def vocab_size(self) -> int:
        """V, the number of ids including padding (the embedding table has V rows)."""
        return len(self.vocab)

    def encode(self, prompts, max_len: int | None = None) -> np.ndarray:
        """prompts (a string or N strings) -> ids int64 (N, L), padded with 0 after the last word."""
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.max_len if max_len is None else max_len
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        prompts = list(prompts)
        ids = np.zeros((len(prompts), int(length)), np.int64)  # (N, L), 0 = padding
        for n, prompt in enumerate(prompts):
            words = split_words(prompt)
            if len(words) > length:
                raise ValueError(f"prompt {short(prompt)} has {len(words)} words but max_len is {length}; "
                                 "use a shorter prompt")
            for l, w in enumerate(words):
                if w not in self.ids or w == PAD:
                    known = ", ".join(self.vocab[1:21]) + (f", ... ({len(self.vocab) - 1} in all)"
                                                             if len(self.vocab) > 21 else "")
                    raise ValueError(f"prompt {short(prompt)} has the unknown word {short(w)}; known words: {known}")
                ids[n, l] = self.ids[w]
        return ids

    def decode(self, ids) -> list[str]:
        """ids (N, L) int -> N prompts, padding dropped (the inverse of encode on normalized prompts)."""
        ids = np.asarray(ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be an integer array of shape (N, L), got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        return [" ".join(self.vocab[i] for i in row if i != 0) for row in ids.tolist()]

    def to_dict(self) -> dict:
        """JSON-serializable form: {"vocab": [...], "max_len": L}."""
        return {"vocab": list(self.vocab), "max_len": self.max_len}

    @classmethod
    def from_dict(cls, d) -> Tokenizer:
        """Inverse of to_dict."""
        if not isinstance(d, dict) or set(d) != {"vocab", "max_len"}:
            raise ValueError(f"tokenizer dict must have exactly the keys 'vocab' and 'max_len', got {d!r:.200}")
        return cls(d["vocab"], d["max_len"])

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, max_len={self.max_len})"
