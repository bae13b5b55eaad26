"""Offline augmentation in the unit of work: ``views`` seeded views of every written sample, made
as its record is processed and written beside it as the samples ``<key>_v01`` … (``view_key``).

A view's members are its parent's, augmented by :class:`mmdata.augment.Augmenter` with draws from
``(seed, key, view)`` only: the image (the resized image still in memory, encoded with the build's
format and quality), the audio (the ``flac`` member decoded losslessly, augmented, re-encoded), the
log-mel (recomputed from the augmented audio, then masked) and the caption. A modality whose ops
all skipped keeps its parent's bytes. The json member is the parent's plus ``view_of``, ``view``,
``augment`` ({modality: ops applied, with their drawn parameters}) and ``augment_seed``.

A view that cannot be made is a ``failed`` row with reason ``augment:<modality>``; the unit goes
on. With ``keep_originals: false`` an original of which a view was written becomes a ``filtered``
row (``replaced:views``): every row is still counted once, and ``inputs = written + filtered +
failed`` holds.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from typing import Optional

import numpy as np
from PIL import Image

from mmdata.augment import Augmenter, view_key
from mmdata.config import BuildConfig
from mmdata.errors import SampleFailed, SampleFiltered
from mmdata.keys import key_to_id, sanitize_key
from mmdata.pipeline.samples.record import image_options
from mmdata.pipeline.samples.sample import Sample, Timer, as_sample_error, mark_not_written, write_json
from mmdata.transforms.image import encode
from mmdata.writers.npy import npy_bytes

IMAGE_MEMBERS = ("jpg", "png", "webp")
# what Pillow raises on an image it cannot decode, transform or encode
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError)


def is_view(sample: Sample) -> bool:
    return sample.view_parent is not None


class ViewMaker:
    """Makes the views of one configuration (built once per worker process, like the processor)."""

    def __init__(self, config: BuildConfig):
        self.config = config
        self.n_views = config.n_views
        self.seed = config.augment_seed
        self.augmenter = Augmenter(config.augment)
        self.image_options = image_options(config)
        # what a view keeps in memory for the encoders: only what --embed-views will embed
        self.keep_image = config.embed_views and "image" in config.embedded_modalities
        self.keep_audio = config.embed_views and config.audio_encoder is not None
        self.parent_needs_image = "image" in config.embedded_modalities

    def __call__(self, produced: list[Sample], timer: Timer) -> list[Sample]:
        """One record's samples, each written one followed by its views."""
        out: list[Sample] = []
        for sample in produced:
            out.append(sample)
            if sample.row["status"] != "written":
                continue
            t0 = time.perf_counter()
            views = [self.view(sample, v) for v in range(1, self.n_views + 1)]
            timer.add("augment", t0)
            out.extend(views)
            if not self.parent_needs_image:
                sample.image = None  # the views have it: free it now, not at the end of the unit
            if not self.config.keep_originals and any(v.row["status"] == "written" for v in views):
                mark_not_written(sample, SampleFiltered("replaced:views"))
        return out

    def view(self, parent: Sample, v: int) -> Sample:
        """View ``v`` of ``parent``: a written sample, or a failed row ``augment:<modality>``."""
        key = view_key(parent.row["key"], v)
        row = {**parent.row, "key": key, "id": key_to_id(key), "view_of": parent.row["key"], "view": v,
               "warnings": list(parent.row["warnings"]), "source_bytes": 0}  # a view reads no source
        doc = {**parent.doc, "view_of": parent.row["key"], "view": v, "augment_seed": self.seed}
        sample = Sample(parent.record, row, meta=parent.meta, doc=doc, view_parent=parent)
        applied: dict[str, list] = {}
        try:
            self._image(parent, sample, v, applied)
            self._audio(parent, sample, v, applied)
            self._text(parent, sample, v, applied)
            doc["augment"] = applied
            write_json(sample)
        except Exception as exc:  # noqa: BLE001 — this view's problem stays in its row
            sample.caption = sample.image = sample.audio = None
            return mark_not_written(sample, as_sample_error(exc))
        row.update(status="written", reason=None)
        return sample

    def _image(self, parent: Sample, sample: Sample, v: int, applied: dict) -> None:
        ext = next((e for e in IMAGE_MEMBERS if e in parent.members), None)
        if ext is None:
            return
        try:
            im = parent.image if parent.image is not None else Image.open(io.BytesIO(parent.members[ext]))
            im, ops = self.augmenter.image(im, parent.row["key"], v, self.seed)
            data = encode(im, self.image_options) if ops else parent.members[ext]
        except _IMAGE_ERRORS as exc:
            raise SampleFailed("augment:image", str(exc)) from None
        applied["image"] = ops
        sample.members[ext] = data
        sample.row.update(width=im.width, height=im.height, image_bytes=len(data),
                          reencoded=True if ops else parent.row.get("reencoded"))
        if self.keep_image:
            sample.image = im

    def _audio(self, parent: Sample, sample: Sample, v: int, applied: dict) -> None:
        if "flac" not in parent.members:
            return
        import soundfile as sf
        from librosa.util.exceptions import ParameterError

        from mmdata.transforms.audio import encode_flac, log_mel

        key, row = parent.row["key"], sample.row
        try:  # 16-bit flac decodes to exactly the values that were encoded
            y, sr = sf.read(io.BytesIO(parent.members["flac"]), dtype="float32", always_2d=False)
            y, ops = self.augmenter.audio(y, sr, key, v, self.seed)
            if not np.isfinite(y).all():
                raise SampleFailed("augment:audio", "non-finite samples after augmentation")
            flac = encode_flac(y, sr) if ops else parent.members["flac"]
        except (ValueError, sf.SoundFileError, ParameterError) as exc:
            raise SampleFailed("augment:audio", str(exc)) from None
        applied["audio"] = ops
        sample.members["flac"] = flac
        row.update(duration=len(y) / sr, sample_rate=sr, channels=1 if y.ndim == 1 else int(y.shape[1]),
                   audio_bytes=len(flac))
        if "mel.npy" in parent.members:
            try:
                mel = log_mel(y, sr, self.config.audio) if ops else np.load(io.BytesIO(parent.members["mel.npy"]))
                mel, mel_ops = self.augmenter.mel(mel, key, v, self.seed)
            except (ValueError, ParameterError) as exc:
                raise SampleFailed("augment:mel", str(exc)) from None
            applied["mel"] = mel_ops
            sample.members["mel.npy"] = npy_bytes(mel) if ops or mel_ops else parent.members["mel.npy"]
        if self.keep_audio:
            sample.audio = (y, sr)

    def _text(self, parent: Sample, sample: Sample, v: int, applied: dict) -> None:
        if parent.caption is None:
            return
        caption, applied["text"] = self.augmenter.text(parent.caption, parent.row["key"], v, self.seed)
        sample.caption = caption
        sample.row["caption"] = caption
        sample.members["txt"] = caption.encode("utf-8")


def rekey_views(views: list[Sample], taken: set[str]) -> None:
    """Key every view after its parent's final key (a segment renamed for a key collision takes its
    views along; their draws stay those of its first key). A view key that an original already
    holds (a file literally named ``cat_v01`` beside ``cat``) gets a suffix hashed from the parent's key."""
    for s in views:
        parent_key = s.view_parent.row["key"]
        key = view_key(parent_key, s.row["view"])
        if key in taken:
            key = sanitize_key(f"{key}_{hashlib.blake2b(parent_key.encode(), digest_size=4).hexdigest()}")
        taken.add(key)
        if (key, parent_key) != (s.row["key"], s.row["view_of"]):
            s.row.update(key=key, id=key_to_id(key), view_of=parent_key)
            s.doc["view_of"] = parent_key
            if "json" in s.members:
                write_json(s)


def embeds(sample: Sample, config: BuildConfig) -> bool:
    """Whether ``sample`` gets real embedding rows: views only with ``embed_views`` (else zero rows,
    left out of the index, so a view never counts as new data in retrieval)."""
    return config.embed_views or not is_view(sample)


def unembedded_view(json_member: Optional[bytes], config: BuildConfig) -> bool:
    """For a sample read back from a tar (``mmdata embed``): a view that must not be embedded."""
    if config.embed_views or json_member is None:
        return False
    return "view_of" in json.loads(json_member)
