"""Caption text: decode bytes, repair mojibake with ftfy, normalise whitespace, bound the length."""
from __future__ import annotations

import re

from mmdata.errors import SampleFailed

_BOMS_UTF16 = (b"\xff\xfe", b"\xfe\xff")


# Among equally plausible decodings of a short text, the legacy encodings most common in corpora first.
_PREFERRED = ("cp1252", "gb18030", "cp1251", "cp949", "euc_kr", "big5", "cp932", "shift_jis", "cp1250", "iso8859_15",
              "koi8_r", "euc_jp", "cp1253", "cp1254", "cp1256", "cp1255", "cp874")
# without a BOM, UTF-16/32 "decode" almost any even-length bytes: never guessed
_SHORT = 16  # non-ASCII bytes below which a text is too short for charset-normalizer to rank encodings
_NO_GUESS = ["utf_16", "utf_16_be", "utf_16_le", "utf_32", "utf_32_be", "utf_32_le", "utf_7"]


def _detect(data: bytes) -> tuple[str, str] | None:
    """The encoding charset-normalizer finds least chaotic (ties broken by ``_PREFERRED``) and the text."""
    from charset_normalizer import from_bytes

    results = from_bytes(data, cp_exclusion=_NO_GUESS)
    if not len(results):
        return None

    def rank(name: str) -> int:
        return _PREFERRED.index(name) if name in _PREFERRED else len(_PREFERRED)

    best = results.best()
    if sum(b > 127 for b in data) < _SHORT:  # too few bytes to tell encodings apart: the commonest plausible one
        top = min((r.chaos, -r.coherence) for r in results)
        tied = [r for r in results if (r.chaos, -r.coherence) == top]
        best = min(tied, key=lambda r: min(rank(n) for n in [r.encoding, *r.could_be_from_charset]))
    name = min([best.encoding, *best.could_be_from_charset], key=rank)
    return name, data.decode(name)


def decode_text(data: bytes) -> tuple[str, list[str]]:
    """UTF-8 (BOM stripped) when possible; else UTF-16 by BOM; else the encoding charset-normalizer
    detects (GB18030, Big5, Shift-JIS, EUC-KR, cp1251, cp1252 …) — recorded as ``text_encoding:<name>``.

    Bytes no encoding decodes plausibly, or mostly control characters, are binary, not text:
    ``SampleFailed("decode:text")`` — never mojibake written silently.
    """
    warnings: list[str] = []
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
        if data[:2] in _BOMS_UTF16:
            try:
                text, name = data.decode("utf-16"), "utf-16"
            except UnicodeDecodeError:
                pass
        if text is None:
            found = _detect(data)
            if found is None:
                raise SampleFailed("decode:text", "no text encoding decodes these bytes plausibly") from None
            name, text = found
        warnings.append(f"text_encoding:{name}")
    controls = sum(1 for ch in text if ord(ch) < 32 and ch not in "\t\n\r")
    if text and controls > max(2, len(text) // 10):
        raise SampleFailed("decode:text", f"{controls} control characters: binary data, not text")
    return text, warnings


def _ftfy():
    import ftfy  # imported for the first caption that needs it (~30 ms a worker saves on plain captions)

    return ftfy


# Printable ASCII and the line/tab whitespace, without '&' (HTML entities): text ftfy leaves as it is
# (once whitespace is collapsed), so the common caption skips ftfy's passes (tests/test_text_fast_path.py).
_PLAIN = re.compile(r"[ -%'-~\t\n\r]*")


def clean_caption(text: str, max_chars: int) -> tuple[str, list[str]]:
    """ftfy-repaired, whitespace-collapsed caption, truncated to ``max_chars`` (recorded)."""
    warnings: list[str] = []
    fixed = " ".join((text if _PLAIN.fullmatch(text) else _ftfy().fix_text(text)).split())
    if len(fixed) > max_chars:
        fixed = fixed[:max_chars].rstrip()
        warnings.append("text_truncated")
    return fixed, warnings
