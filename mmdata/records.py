"""Records and work units: what a plan is made of.

A record is one input sample before processing: its key and id, the source file of each
modality, an inline caption (manifests) and extra metadata. ``problem`` carries a reason found
while planning (an ambiguous pair, an unsupported file) so the record still reaches the unit and is
counted there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional



def _optional_image_exts() -> set[str]:
    """Phone formats this Pillow can decode: AVIF (Pillow ≥ 11.2 built with libavif), HEIC/HEIF
    (with the optional ``pillow-heif`` plugin, registered by :mod:`mmdata.transforms.image`)."""
    import importlib.util

    exts = set()
    try:
        from PIL import features

        if features.check("avif"):
            exts.add("avif")
    except (ImportError, ValueError):
        pass
    if importlib.util.find_spec("pillow_heif") is not None:
        exts |= {"heic", "heif"}
    return exts


IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"} | _optional_image_exts())
AUDIO_EXTS = frozenset({"wav", "flac", "ogg", "oga", "opus", "mp3", "aiff", "aif", "m4a", "aac", "wma"})
TRANSCRIPT_EXTS = frozenset({"srt", "vtt"})
TEXT_EXTS = frozenset({"txt"})
META_EXTS = frozenset({"json"})


def modality_of(ext: str) -> Optional[str]:
    """The source slot a file extension fills (``image``, ``text``, ``json``, ``audio``, ``transcript``)."""
    ext = ext.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in TEXT_EXTS:
        return "text"
    if ext in META_EXTS:
        return "json"
    if ext in AUDIO_EXTS:
        return "audio"
    if ext in TRANSCRIPT_EXTS:
        return "transcript"
    return None


@dataclass
class Record:
    key: str
    id: int
    sources: dict[str, str] = field(default_factory=dict)
    caption: Optional[str] = None
    meta: dict = field(default_factory=dict)
    problem: Optional[str] = None
    warnings: list[str] = field(default_factory=list)
    # planned keys of other records that look derived from this one (``plan.reserve_derived_keys``)
    reserved: list[str] = field(default_factory=list)


@dataclass
class Unit:
    """One work unit: becomes shard ``index``."""

    index: int
    records: list[Record]

    @property
    def name(self) -> str:
        return f"{self.index:05d}"

    @property
    def n_records(self) -> int:
        return len(self.records)


@dataclass(frozen=True)
class UnitRef:
    """A planned unit as the driver and the engines see it: its index (its row group of ``plan.parquet``),
    how many records it holds and its plan digest. The worker that runs it reads its records."""

    index: int
    n_records: int
    digest: str

    @property
    def name(self) -> str:
        return f"{self.index:05d}"


class UnitIndex(int):
    """A unit's index alone, with a unit's ``index`` and ``name``: what the Beam graph carries per unit."""

    @property
    def index(self) -> int:
        return int(self)

    @property
    def name(self) -> str:
        return f"{int(self):05d}"
