"""Caption text: decode bytes, repair mojibake with ftfy, normalise whitespace, bound the length."""
from __future__ import annotations

import ftfy

from mmdata.errors import SampleFailed

_BOMS_UTF16 = (b"\xff\xfe", b"\xfe\xff")


def decode_text(data: bytes) -> tuple[str, list[str]]:
    """UTF-8 (BOM stripped) when possible; else UTF-16 by BOM, cp1252, latin-1 — with a warning.

    Data that is mostly control characters is binary, not text: ``SampleFailed("decode:text")``.
    """
    warnings: list[str] = []
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
        for encoding in (("utf-16",) if data[:2] in _BOMS_UTF16 else ()) + ("cp1252", "latin-1"):
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError:
                continue
            warnings.append(f"text_encoding:{encoding}")
            break
    controls = sum(1 for ch in text if ord(ch) < 32 and ch not in "\t\n\r")
    if text and controls > max(2, len(text) // 10):
        raise SampleFailed("decode:text", f"{controls} control characters: binary data, not text")
    return text, warnings


def clean_caption(text: str, max_chars: int) -> tuple[str, list[str]]:
    """ftfy-repaired, whitespace-collapsed caption, truncated to ``max_chars`` (recorded)."""
    warnings: list[str] = []
    fixed = " ".join(ftfy.fix_text(text).split())
    if len(fixed) > max_chars:
        fixed = fixed[:max_chars].rstrip()
        warnings.append("text_truncated")
    return fixed, warnings
