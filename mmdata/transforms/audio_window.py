"""Long recordings with bounded memory: the length from the header alone (:func:`probe_header`), and
:class:`WindowedAudio`, a recording's processed samples decoded one window at a time (seek + bounded read)."""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
import soundfile as sf

from mmdata.transforms.audio import _UNKNOWN_FRAMES, _read_all, _wav_header_frames, downmix, resample, sniff_container
from mmdata.errors import SampleFailed

# Containers libsndfile seeks exactly (sample-accurate): their header's frame count is read before
# any decoding, and a long recording is decoded one window at a time.
SEEKABLE_CONTAINERS = frozenset({"wav", "flac", "aiff", "w64", "caf", "au"})


def probe_header(data: bytes) -> Optional[dict]:
    """``{container, sample_rate, channels, frames, duration}`` from the header alone (no decoding), or
    None when the container is not one libsndfile seeks or its length is not declared."""
    container = sniff_container(data)
    if container not in SEEKABLE_CONTAINERS:
        return None
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return None
    frames, sr = int(info.frames), int(info.samplerate)
    if container == "wav":
        frames = _wav_header_frames(data) or 0  # a streamed WAV's placeholder is not a length
    if frames <= 0 or frames >= _UNKNOWN_FRAMES or sr <= 0 or info.channels <= 0:
        return None
    return {"container": container, "sample_rate": sr, "channels": int(info.channels), "frames": frames,
            "duration": frames / sr}


class WindowedAudio:
    """A long recording seen as its processed (downmixed when ``mono``, resampled) samples, decoded one
    window at a time: ``len(x)`` and ``x[i0:i1]`` (an ``np.ndarray``) like the array it stands for,
    with memory bounded by the window, not the recording. Windows start on a frame where the source and
    output rates align, with ``margin_s`` of context either side for the resampler."""

    def __init__(self, data: bytes, header: dict, mono: bool, out_sr: int, quality: str = "HQ",
                 margin_s: float = 0.1, mix: bool = False):
        self.data, self.header, self.mono, self.out_sr, self.quality = data, header, mono, out_sr, quality
        self.mix = mix
        sr = header["sample_rate"]
        g = np.gcd(sr, out_sr)
        self._step_in, self._step_out = sr // g, out_sr // g  # aligned blocks: step_in source = step_out output
        self._margin = -(-int(margin_s * sr) // self._step_in)  # in aligned blocks
        self._len = int(round(header["frames"] * out_sr / sr))
        self.ndim = 1 if (mono or mix) else 2

    def __len__(self) -> int:
        return self._len

    def mean(self, axis: int = 1) -> "WindowedAudio":
        return WindowedAudio(self.data, self.header, self.mono, self.out_sr, self.quality, mix=True)

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("WindowedAudio takes contiguous slices only")
        i0, i1, _ = index.indices(self._len)
        i1 = max(i0, i1)
        frames, sr = self.header["frames"], self.header["sample_rate"]
        b0 = max(0, i0 // self._step_out - self._margin)  # first aligned block
        a0 = b0 * self._step_in
        a1 = min(frames, -(-i1 * sr // self.out_sr) + self._margin * self._step_in)
        bio = io.BytesIO(self.data)
        try:
            with sf.SoundFile(bio) as f:
                try:
                    f.seek(a0)
                except sf.LibsndfileError as exc:  # the frame the header declares is not in the bytes
                    raise SampleFailed("truncated:audio", f"cannot seek to frame {a0} of {frames}: "
                                                          f"{exc.error_string}") from None
                x = _read_all(f, bio, len(self.data), max(0, a1 - a0))
        except sf.LibsndfileError as exc:
            raise SampleFailed("decode:audio", f"{self.header['container']}: {exc.error_string}") from None
        if len(x) < a1 - a0:
            raise SampleFailed("truncated:audio", f"decoded {a0 + len(x)} of {frames} frames the header declares")
        if not np.isfinite(x).all():
            raise SampleFailed("nonfinite:audio", f"{int(np.count_nonzero(~np.isfinite(x)))} NaN/inf samples")
        if self.mono or self.mix:
            x = downmix(x)
        y = resample(x, sr, self.out_sr, self.quality)
        off = b0 * self._step_out
        return y[i0 - off:i1 - off]
