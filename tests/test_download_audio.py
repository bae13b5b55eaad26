"""Audio URLs in a manifest (issue 12): ``--audio-col`` names a column of audio paths or http(s) URLs;
URLs are downloaded by the unit like images (same client, politeness, caps and reasons), and the
written audio is the one the same files give when read from disk. Generated WAV/FLAC served by a
local server on 127.0.0.1."""
import csv
import io
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conftest import run_build
from test_download import FAST, Handler, serving

from mmdata.sources.manifest import read_manifest, read_manifest_batches


def tone(sr, channels, seconds, freq):
    t = np.arange(int(sr * seconds)) / sr
    return np.stack([0.3 * np.sin(2 * np.pi * freq * (1 + c / 4) * t) for c in range(channels)], axis=1).astype(np.float32)


def encoded(name: str) -> bytes:
    """``a3.wav`` / ``a3.flac``: a tone whose pitch, rate and channels depend on the number."""
    i = int(name[1:].split(".")[0])
    buf = io.BytesIO()
    sf.write(buf, tone([16000, 22050, 44100][i % 3], 1 + i % 2, 0.5 + 0.1 * i, 220.0 * (i + 1)),
             [16000, 22050, 44100][i % 3], format=name.rsplit(".", 1)[1].upper())
    return buf.getvalue()


class AudioHandler(Handler):
    def do_GET(self):
        parts = self.path.strip("/").split("/")
        if parts[0] == "audio":
            with self.server.lock:
                self.server.audio_log.append(self.path)
            ctype = "audio/wav" if parts[-1].endswith(".wav") else "audio/flac"
            self.send(200, encoded(parts[-1]), ctype=ctype)
        elif parts[0] == "octet":  # no audio type declared: the bytes decide
            with self.server.lock:
                self.server.audio_log.append(self.path)
            self.send(200, encoded(parts[-1]), ctype="application/octet-stream")
        elif parts[0] == "bigaudio":  # declared over the cap
            self.send(200, b"", ctype="audio/wav", length=5_000_000)
        elif parts[0] == "noise":  # declared audio, bytes that are not
            self.send(200, b"RIFF not really a wave file", ctype="audio/wav")
        else:
            super().do_GET()


@pytest.fixture()
def server():
    with serving(AudioHandler, audio_log=[]) as srv:
        yield srv


def write_manifest(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "sound", "caption"])
        w.writerows(rows)
    return path


def shard_rows(out):
    return {r["key"]: r for f in sorted(out.glob("shards/*.parquet")) for r in pq.read_table(f).to_pylist()}


def flac_members(out):
    found = {}
    for f in sorted(out.glob("shards/*.tar")):
        with tarfile.open(f) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".flac"):
                    found[m.name[: -len(".flac")]] = tar.extractfile(m).read()
    return found


NAMES = ["a0.wav", "a1.flac", "a2.wav", "a3.flac", "a4.flac"]


def test_audio_urls_download_like_images_and_give_the_audio_local_files_give(server, tmp_path):
    b = server.base
    faults = {"missing": (f"{b}/status/404/x.wav", "failed", "http:404"),
              "busy": (f"{b}/status/503/x.wav", "failed", "http:503"),
              "page": (f"{b}/html/x.wav", "failed", "content:text/html"),
              "huge": (f"{b}/bigaudio/x.wav", "failed", "too_large"),
              "image": (f"{b}/img/x.wav", "failed", "content:image/jpeg"),
              "optout": (f"{b}/optout/noai/x.wav", "filtered", "optout:noai"),
              "octet": (f"{b}/octet/a2.wav", "written", None),
              "not_audio": (f"{b}/noise/x.wav", "failed", None)}
    urls = [(f"k{i}", f"{b}/audio/{n}", f"sound {i}") for i, n in enumerate(NAMES)]
    urls += [(k, u, f"fault {k}") for k, (u, _, _) in faults.items()]
    m = run_build(write_manifest(tmp_path / "urls.csv", urls), tmp_path / "out", key_col="key", image_col="none",
                  audio_col="sound", require=["audio", "text"], **FAST)
    c = m["counts"]
    assert c["inputs"] == len(urls) == c["written"] + c["filtered"] + c["failed"]
    got = shard_rows(tmp_path / "out")
    for k, (_, status, reason) in faults.items():
        assert got[k]["status"] == status, (k, got[k])
        if reason:
            assert got[k]["reason"] == reason, (k, got[k])
    assert got["not_audio"]["reason"].startswith("decode:"), got["not_audio"]
    assert sorted(server.audio_log) == sorted([f"/audio/{n}" for n in NAMES] + ["/octet/a2.wav"])  # each fetched once
    assert m["downloads"]["urls"] == len(urls) and m["downloads"]["outcomes"]["ok"] == len(NAMES) + 2
    # the same files read from disk: the same audio written, sample for sample
    for n in NAMES:
        (tmp_path / n).write_bytes(encoded(n))
    local = [(f"k{i}", n, f"sound {i}") for i, n in enumerate(NAMES)]
    run_build(write_manifest(tmp_path / "local.csv", local), tmp_path / "local", key_col="key", image_col="none",
              audio_col="sound", require=["audio", "text"], workers=1)
    from_disk, from_web = flac_members(tmp_path / "local"), flac_members(tmp_path / "out")
    assert len(from_disk) == len(NAMES)
    for k, data in from_disk.items():
        assert from_web[k] == data, k
    disk_rows = shard_rows(tmp_path / "local")
    for i, n in enumerate(NAMES):
        assert got[f"k{i}"]["audio_sha256"] == disk_rows[f"k{i}"]["audio_sha256"]
        assert got[f"k{i}"]["source_sample_rate"] == [16000, 22050, 44100][i % 3]


def test_audio_column_in_the_plan_and_its_errors(tmp_path):
    """Audio beside an image, audio alone (its path gives the key), neither; the streaming reader and
    the row-by-row one agree; a missing --audio-col column is one clear error."""
    path = tmp_path / "m.csv"
    path.write_text("img,snd,caption,extra\nimgs/a.png,sounds/a.wav,both,1\n,sounds/b.flac,audio only,2\n"
                    ",,nothing,3\nhttp://h/x.jpg,https://h/s/y.wav?sig=1,web,4\n")
    streamed = [r for t in read_manifest_batches(str(path), "img", "caption", None, audio_col="snd") for r in t.to_pylist()]
    rows = read_manifest(str(path), "img", "caption", None, audio_col="snd")
    import json

    assert [(r["raw_key"], json.loads(r["sources"]), r["caption"], json.loads(r["meta"])) for r in streamed] == \
           [(k, s, c, m) for k, s, c, m in rows]
    assert [r["raw_key"] for r in streamed] == ["imgs/a", "sounds/b", "row000000002", "h/x"]
    assert json.loads(streamed[0]["sources"]) == {"image": f"{tmp_path}/imgs/a.png", "audio": f"{tmp_path}/sounds/a.wav"}
    assert streamed[0]["sources"].index('"audio"') < streamed[0]["sources"].index('"image"')  # sorted as the plan was
    assert json.loads(streamed[3]["sources"])["audio"] == "https://h/s/y.wav?sig=1"
    assert json.loads(streamed[0]["meta"]) == {"extra": 1}
    from mmdata.errors import UserError

    with pytest.raises(UserError, match="has no audio column 'sound'"):
        list(read_manifest_batches(str(path), "img", "caption", None, audio_col="sound"))
