"""Hostile inputs (issue 11): one record's problem stays in that record's row, whatever it raises."""
import glob
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmdata.cli.main import app
from mmdata.transforms.text import clean_caption


def photo(path, color=(200, 40, 40), size=(64, 48)):
    Image.new("RGB", size, color).save(path)


def build(corpus, out, *extra):
    args = ["build", "--input", str(corpus), "--out", str(out), "--no-index", "--samples-per-shard", "4",
            "--workers", "1", "--no-progress", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return json.load(open(os.path.join(out, "manifest.json")))


def rows(out):
    return {r["key"]: r for f in sorted(glob.glob(f"{out}/shards/*.parquet")) for r in pq.read_table(f).to_pylist()}


def members(out):
    got: dict[str, dict[str, bytes]] = {}
    for f in sorted(glob.glob(f"{out}/shards/*.tar")):
        with tarfile.open(f) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                got.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return got


def assert_reconciles(manifest, table):
    c = manifest["counts"]
    assert c["inputs"] == c["written"] + c["filtered"] + c["failed"] == len(table)
    assert all(r["status"] == "written" or r["reason"] for r in table.values())


def test_a_sidecar_nested_100000_deep_fails_its_row_only(tmp_path):
    corpus, out = tmp_path / "in", tmp_path / "out"
    corpus.mkdir()
    for stem in ("a", "b", "deep", "d", "e"):
        photo(corpus / f"{stem}.jpg")
        (corpus / f"{stem}.txt").write_text(f"a photo called {stem}")
    (corpus / "b.json").write_text(json.dumps({"license": "cc-by"}))
    (corpus / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    manifest = build(corpus, out)
    table = rows(out)
    assert_reconciles(manifest, table)
    assert table["deep"]["status"] == "failed" and table["deep"]["reason"] == "decode:json"
    assert any(w.startswith("detail:") for w in table["deep"]["warnings"])
    assert {k for k, r in table.items() if r["status"] == "written"} == {"a", "b", "d", "e"}
    assert json.loads(members(out)["b"]["json"])["meta"]["license"] == "cc-by"


def speech(path, seconds=3.0, sr=16000):
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr, subtype="PCM_16")


@pytest.mark.parametrize("words", [5, 2.5, True])
def test_a_whisper_transcript_whose_words_is_not_a_list_fails_its_row_only(tmp_path, words):
    pytest.importorskip("soundfile")
    corpus, out = tmp_path / "in", tmp_path / "out"
    corpus.mkdir()
    for stem in ("bad", "good"):
        speech(corpus / f"{stem}.wav")
    whisper = {"text": "hello there", "segments": [{"start": 0.5, "end": 2.0, "text": "hello there", "words": words}]}
    (corpus / "bad.json").write_text(json.dumps(whisper))
    (corpus / "good.json").write_text(json.dumps({**whisper, "segments": [{**whisper["segments"][0], "words": []}]}))
    speech(corpus / "deep.wav")  # a recording whose .json sidecar is nested 100,000 deep
    (corpus / "deep.json").write_text("{\"a\": " * 100_000 + "1" + "}" * 100_000)
    (corpus / "deep.txt").write_text("a tone")
    manifest = build(corpus, out, "--require", "audio,text")
    table = rows(out)
    assert_reconciles(manifest, table)
    assert table["bad"]["status"] == "failed" and table["bad"]["reason"] == "decode:transcript", table["bad"]
    assert (table["deep"]["status"], table["deep"]["reason"]) == ("failed", "decode:json")
    assert table["good_s0000"]["status"] == "written"


def test_sidecars_captions_and_transcripts_over_the_size_cap_fail_their_row(tmp_path):
    pytest.importorskip("soundfile")
    corpus, out = tmp_path / "in", tmp_path / "out"
    corpus.mkdir()
    for stem in ("ok", "bigjson", "bigtxt"):
        photo(corpus / f"{stem}.jpg")
        (corpus / f"{stem}.txt").write_text(f"a photo called {stem}")
    (corpus / "ok.json").write_text(json.dumps({"note": "x" * 100}))
    (corpus / "bigjson.json").write_text(json.dumps({"note": "x" * 5000}))
    (corpus / "bigtxt.txt").write_text("a long caption " * 400)
    speech(corpus / "talk.wav")
    (corpus / "talk.srt").write_text("1\n00:00:00,500 --> 00:00:02,000\n" + "hello " * 1000 + "\n")
    manifest = build(corpus, out, "--max-sidecar-bytes", "4096", "--require", "text")
    table = rows(out)
    assert_reconciles(manifest, table)
    assert table["ok"]["status"] == "written"
    assert (table["bigjson"]["status"], table["bigjson"]["reason"]) == ("failed", "too_large:json")
    assert (table["bigtxt"]["status"], table["bigtxt"]["reason"]) == ("failed", "too_large:text")
    assert (table["talk"]["status"], table["talk"]["reason"]) == ("failed", "too_large:transcript")
    assert manifest["reasons"]["failed"] == {"too_large:json": 1, "too_large:text": 1, "too_large:transcript": 1}


CHINESE = "一只橘猫坐在窗台上，阳光透过玻璃洒在它的毛上。"
RUSSIAN = "Рыжая кошка сидит на подоконнике и смотрит на улицу."


def test_captions_and_transcripts_in_any_encoding_are_decoded_not_mojibake(tmp_path):
    pytest.importorskip("soundfile")
    corpus, out = tmp_path / "in", tmp_path / "out"
    corpus.mkdir()
    for stem in ("zh", "ru", "garbage", "plain"):
        photo(corpus / f"{stem}.jpg")
    (corpus / "zh.txt").write_bytes(CHINESE.encode("gb18030"))
    (corpus / "ru.txt").write_bytes(RUSSIAN.encode("cp1251"))
    (corpus / "garbage.txt").write_bytes(np.random.default_rng(0).integers(128, 256, 400, dtype=np.uint8).tobytes())
    (corpus / "plain.txt").write_text("a plain caption")
    speech(corpus / "talk.wav")
    (corpus / "talk.srt").write_bytes(f"1\n00:00:00,500 --> 00:00:02,000\n{CHINESE}\n".encode("gb18030"))
    manifest = build(corpus, out, "--require", "text")
    table, got = rows(out), members(out)
    assert_reconciles(manifest, table)
    chinese = clean_caption(CHINESE, 4096)[0]  # ftfy makes the full-width comma ASCII
    assert "橘猫坐在窗台上" in chinese
    assert got["zh"]["txt"].decode() == chinese and table["zh"]["caption"] == chinese
    assert "text_encoding:gb18030" in table["zh"]["warnings"]
    assert got["ru"]["txt"].decode() == RUSSIAN and "text_encoding:cp1251" in table["ru"]["warnings"]
    assert (table["garbage"]["status"], table["garbage"]["reason"]) == ("failed", "decode:text")
    assert table["plain"]["status"] == "written" and table["plain"]["warnings"] == []
    assert got["talk_s0000"]["txt"].decode() == chinese
    assert "text_encoding:gb18030" in table["talk_s0000"]["warnings"]


@pytest.mark.parametrize("text,encoding", [
    (CHINESE, "gb18030"), ("一隻貓坐在墊子上，陽光從窗戶灑進來。", "big5"), ("今日は天気がいいですね。散歩に行きましょう。", "cp932"),
    ("고양이가 매트 위에 앉아 있다", "cp949"), (RUSSIAN, "cp1251"), ("Grüße aus München, très bien", "cp1252"),
], ids=lambda v: v if v.isascii() else "text")
def test_decode_text_detects_legacy_encodings(text, encoding):
    from mmdata.transforms.text import decode_text

    assert decode_text(text.encode(encoding)) == (text, [f"text_encoding:{encoding}"])


def test_random_bytes_are_decode_text_never_mojibake():
    from mmdata.errors import SampleFailed
    from mmdata.transforms.text import decode_text

    rng = np.random.default_rng(1)
    for n in (64, 300, 3000):
        data = rng.integers(128, 256, n, dtype=np.uint8).tobytes()  # no control characters: not obviously binary
        with pytest.raises(SampleFailed, match="decode:text"):
            decode_text(data)


def strict_json(data: bytes):
    def refuse(token):
        raise AssertionError(f"invalid JSON token {token}")

    return json.loads(data, parse_constant=refuse)


def test_sample_json_and_meta_never_hold_nan_or_infinity(tmp_path):
    corpus, out = tmp_path / "in", tmp_path / "out"
    corpus.mkdir()
    for stem in ("nan", "fine"):
        photo(corpus / f"{stem}.jpg")
        (corpus / f"{stem}.txt").write_text(f"a photo called {stem}")
    (corpus / "nan.json").write_text('{"score": NaN, "nested": {"x": [1.5, Infinity, -Infinity]}, "ok": 2.5}')
    (corpus / "fine.json").write_text('{"score": 0.5}')
    build(corpus, out)
    table, got = rows(out), members(out)
    doc = strict_json(got["nan"]["json"])
    assert doc["meta"] == {"score": None, "nested": {"x": [1.5, None, None]}, "ok": 2.5}
    assert "nonfinite:json_null" in table["nan"]["warnings"]
    assert strict_json(got["fine"]["json"])["meta"] == {"score": 0.5} and table["fine"]["warnings"] == []

    # a manifest whose metadata columns hold NaN / inf: the row's meta column and the json member
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": [str(corpus / "nan.jpg"), str(corpus / "fine.jpg")], "caption": ["a", "b"],
                             "score": [float("nan"), 0.25], "ratio": [float("inf"), 1.0]}), manifest)
    build(manifest, tmp_path / "out2")
    table, got = rows(tmp_path / "out2"), members(tmp_path / "out2")
    assert len(table) == 2 and all(r["status"] == "written" for r in table.values())
    for key, r in table.items():
        meta = strict_json(r["meta"].encode())
        assert strict_json(got[key]["json"])["meta"] == meta
    metas = {k: strict_json(r["meta"].encode()) for k, r in table.items()}
    assert sorted((str(m["score"]), str(m["ratio"])) for m in metas.values()) == [("0.25", "1.0"), ("None", "None")]


def test_importing_the_image_transform_leaves_the_warning_filters_alone(tmp_path):
    import subprocess
    import sys

    code = ("import warnings; import numpy; from PIL import Image; before = list(warnings.filters); "
            "import mmdata.transforms.image as m; "
            "added = [f for f in warnings.filters if f not in before]; "
            "assert not any(issubclass(Image.DecompressionBombWarning, f[2]) for f in added), added; "
            "import io; buf = io.BytesIO(); Image.new('RGB', (40, 30)).save(buf, 'PNG'); "
            "now = list(warnings.filters); m.ImageTransform(m.ImageOptions(max_pixels=10**9))(buf.getvalue()); "
            "assert list(warnings.filters) == now; print('ok')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_a_pillow_bomb_warning_is_still_silenced_inside_the_transform():
    import warnings

    from PIL import Image

    from mmdata.transforms.image import ImageOptions, ImageTransform

    buf = io.BytesIO()
    Image.new("RGB", (3000, 2000)).save(buf, "PNG")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 4_000_000  # 6 Mpx: over Pillow's warning threshold, under its error one (2x)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = ImageTransform(ImageOptions(size=64, max_pixels=10**9))(buf.getvalue())
            with Image.open(io.BytesIO(buf.getvalue())):
                pass  # outside the transform the user's filters apply: the warning shows
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    assert (result.width, result.height) == (96, 64)
    assert [w.category for w in caught] == [Image.DecompressionBombWarning]


def test_avif_photos_are_accepted_when_pillow_decodes_them(tmp_path):
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")
    corpus, out = tmp_path / "in", tmp_path / "out"
    corpus.mkdir()
    Image.new("RGB", (120, 80), (30, 160, 90)).save(corpus / "phone.avif", quality=90)
    (corpus / "phone.txt").write_text("a photo from a phone")
    (corpus / "Upper.AVIF").write_bytes((corpus / "phone.avif").read_bytes())
    (corpus / "Upper.txt").write_text("upper-case extension")
    (corpus / "broken.avif").write_bytes(b"\x00\x00\x00\x1cftypavif" + b"\x00" * 50)
    (corpus / "broken.txt").write_text("a broken avif")
    manifest = build(corpus, out, "--image-size", "40")
    table, got = rows(out), members(out)
    assert_reconciles(manifest, table)
    for key in ("phone", "Upper"):
        r = table[key]
        assert r["status"] == "written" and r["source_format"] == "AVIF" and (r["orig_width"], r["orig_height"]) == (120, 80)
        im = Image.open(io.BytesIO(got[key]["jpg"]))
        assert im.size == (60, 40)
        red, green, blue = im.convert("RGB").getpixel((30, 20))
        assert green > 120 and red < 80 and blue < 130  # the photo's colour, decoded
    assert (table["broken"]["status"], table["broken"]["reason"]) == ("failed", "decode:image")
