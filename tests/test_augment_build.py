"""Offline augmentation in `mmdata build`: `--augment CONFIG --views N --seed S` writes N seeded views
per written sample as `<key>_v01` …, read back through webdataset with their parents; counts
reconcile; the same seed gives the same bytes on any worker count and run, another seed other
views but the same originals; views get zero embedding rows unless `--embed-views`."""
import glob
import hashlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from conftest import run_build
from PIL import Image
from test_resume_and_cli import assert_one_line_error, cli

from mmdata.augment import Augmenter
from mmdata.config import load_config
from mmdata.pipeline.samples.record import RecordProcessor
from mmdata.pipeline.samples.sample import Timer
from mmdata.pipeline.samples.views import ViewMaker
from mmdata.records import Record
from mmdata.tools.verify import verify_output
from mmdata.writers.tar import read_tar_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "pipelines", "configs", "augment_example.yaml")
TINY = dict(model="mmdata-tiny", pretrained="random", embed_batch_size=8)
SIZED = {"image": [{"op": "random_resized_crop", "p": 1.0, "scale": [0.3, 1.0], "size": [64, 48]},
                   {"op": "horizontal_flip", "p": 0.5}],
         "text": [{"op": "template", "p": 1.0, "templates": ["a photo of {}"]}]}


def table(out):
    return [r for f in sorted(glob.glob(f"{out}/shards/*.parquet")) for r in pq.read_table(f).to_pylist()]


def read_back(out):
    return list(wds.WebDataset(sorted(glob.glob(f"{out}/shards/*.tar")), shardshuffle=False).decode("pil"))


def raw_samples(out):
    """{key: {member: bytes}} of every shard."""
    return {k: m for f in sorted(glob.glob(f"{out}/shards/*.tar")) for k, m in read_tar_samples(open(f, "rb"))}


def digests(out):
    files = sorted(glob.glob(f"{out}/shards/*.tar") + glob.glob(f"{out}/shards/*.parquet"))
    return {os.path.basename(f): hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def viewed(corpus, tmp_path_factory):
    """The demo corpus with two views per sample (the example config), 2 workers, tokens on."""
    out = tmp_path_factory.mktemp("viewed")
    return str(out), run_build(corpus[0], out, workers=2, augment=EXAMPLE, views=2, tokenize=True)


def test_views_read_back_with_their_parents(corpus, viewed):
    out, manifest = viewed
    samples = read_back(out)
    by_key = {s["__key__"]: s for s in samples}
    keys = [s["__key__"] for s in samples]
    assert keys == sorted(keys)
    views = [s for s in samples if "view_of" in s["json"]]
    originals = [s for s in samples if "view_of" not in s["json"]]
    assert len(originals) == corpus[1]["written"] and len(views) == 2 * len(originals)
    assert manifest["counts"]["written"] == 3 * corpus[1]["written"]
    for s in views:
        doc, (parent, v) = s["json"], s["__key__"].rsplit("_v", 1)
        assert doc["view_of"] == parent and parent in by_key and doc["view"] == int(v) in (1, 2)
        assert doc["augment_seed"] == 0 and set(doc["augment"]) == {"image", "text"}
        assert doc["augment"]["image"][0]["op"] == "random_resized_crop"  # p = 1: always applied, recorded
        up = by_key[parent]["json"]
        assert doc["key"] == s["__key__"] and doc["meta"] == up["meta"] and doc["sources"] == up["sources"]
        assert isinstance(s["jpg"], Image.Image) and s["txt"].endswith(by_key[parent]["txt"])
        assert s["tokens.npy"].shape == by_key[parent]["tokens.npy"].shape  # views are tokenized too
        fired = [t["template"] for t in doc["augment"]["text"] if t["op"] == "template"]
        assert s["txt"] == (fired[0].format(by_key[parent]["txt"]) if fired else by_key[parent]["txt"])


def test_counts_reconcile_and_broken_inputs_stay_failed(corpus, viewed):
    out, manifest = viewed
    rows, c = table(out), manifest["counts"]
    assert c["inputs"] == len(rows) == c["written"] + c["filtered"] + c["failed"]
    originals = [r for r in rows if r["view_of"] is None]
    assert manifest["records"] == len(originals) == len(pq.read_table(f"{out}/plan.parquet"))
    assert manifest["reasons"] == {"filtered": corpus[1]["filtered"], "failed": corpus[1]["failed"]}
    not_written = {r["key"] for r in originals if r["status"] != "written"}
    assert not_written and all(r["view_of"] not in not_written for r in rows)  # broken inputs: no views
    for r in rows:
        if r["view_of"] is not None:
            assert r["status"] == "written" and r["key"] == f"{r['view_of']}_v{r['view']:02d}" and r["source_bytes"] == 0
        else:
            assert r["view"] is None
    assert verify_output(out) == []


def test_same_seed_same_bytes_whatever_the_workers_and_run(corpus, viewed, tmp_path):
    out, _ = viewed
    run_build(corpus[0], tmp_path / "w1", workers=1, augment=EXAMPLE, views=2, tokenize=True)
    run_build(corpus[0], tmp_path / "w2", workers=2, augment=EXAMPLE, views=2, tokenize=True)
    assert digests(out) == digests(tmp_path / "w1") == digests(tmp_path / "w2")
    assert len(digests(out)) == 2 * len(glob.glob(f"{out}/shards/*.tar")) > 2


def test_another_seed_changes_the_views_not_the_originals(corpus, viewed, tmp_path):
    out, _ = viewed
    run_build(corpus[0], tmp_path / "s1", workers=2, augment=EXAMPLE, views=2, tokenize=True, augment_seed=1)
    a, b = raw_samples(out), raw_samples(tmp_path / "s1")
    assert sorted(a) == sorted(b)
    views = [k for k in a if "view_of" in json.loads(a[k]["json"])]
    assert views and all(a[k] == b[k] for k in a if k not in views)
    assert all(a[k]["jpg"] != b[k]["jpg"] for k in views)
    assert {json.loads(b[k]["json"])["augment_seed"] for k in views} == {1}


def test_view_images_have_the_size_the_ops_say(corpus, tmp_path):
    manifest = run_build(corpus[0], tmp_path / "sized", workers=1, augment=SIZED, views=1)
    assert manifest["counts"]["written"] == 2 * corpus[1]["written"]
    rows = {r["key"]: r for r in table(tmp_path / "sized")}
    for s in read_back(tmp_path / "sized"):
        doc = s["json"]
        if "view_of" not in doc:
            assert s["jpg"].size == (rows[s["__key__"]]["width"], rows[s["__key__"]]["height"]) != (64, 48)
            continue
        assert s["jpg"].size == (64, 48) == (rows[s["__key__"]]["width"], rows[s["__key__"]]["height"])
        crop = doc["augment"]["image"][0]
        assert crop["size"] == [64, 48] and doc["width"] == 64
        left, top, right, bottom = crop["box"]
        parent = rows[doc["view_of"]]
        assert 0 <= left < right <= parent["width"] and 0 <= top < bottom <= parent["height"]
        assert s["txt"] == "a photo of " + parent["caption"]
    assert verify_output(str(tmp_path / "sized")) == []


def test_ops_that_skip_keep_the_parent_bytes(corpus, tmp_path):
    cfg = {"image": [{"op": "horizontal_flip", "p": 0.0}], "text": [{"op": "template", "p": 0.0, "templates": ["{}!"]}]}
    run_build(corpus[0], tmp_path / "skip", workers=1, augment=cfg, views=1)
    got = raw_samples(tmp_path / "skip")
    views = {k: m for k, m in got.items() if k.endswith("_v01")}
    assert len(views) == corpus[1]["written"]
    for key, m in views.items():
        parent = got[key[: -len("_v01")]]
        assert m["jpg"] == parent["jpg"] and m["txt"] == parent["txt"]
        assert json.loads(m["json"])["augment"] == {"image": [], "text": []}


def test_drop_originals_keeps_their_rows_as_filtered(corpus, tmp_path):
    out = tmp_path / "dropped"
    manifest = run_build(corpus[0], out, workers=1, augment=EXAMPLE, views=1, keep_originals=False)
    n = corpus[1]["written"]
    rows = table(out)
    replaced = [r for r in rows if r["reason"] == "replaced:views"]
    assert len(replaced) == n and all(r["status"] == "filtered" and r["view_of"] is None for r in replaced)
    assert manifest["counts"]["written"] == n and manifest["reasons"]["filtered"]["replaced:views"] == n
    keys = list(raw_samples(out))
    assert len(keys) == n and all(k.endswith("_v01") for k in keys)
    assert {k[: -len("_v01")] for k in keys} == {r["key"] for r in replaced}
    assert verify_output(str(out)) == []


def test_views_have_zero_embedding_rows_unless_embed_views(corpus, tmp_path):
    for embed_views in (False, True):
        out = tmp_path / f"embed_{embed_views}"
        manifest = run_build(corpus[0], out, workers=1, augment=SIZED, views=1, embed_views=embed_views, **TINY)
        n = corpus[1]["written"]
        for f in sorted(glob.glob(f"{out}/shards/*.parquet")):
            written = [r for r in pq.read_table(f).to_pylist() if r["status"] == "written"]
            for modality in ("image", "text"):
                rows = np.load(f"{out}/embeddings/{modality}/{os.path.basename(f)[:-8]}.npy").astype(np.float32)
                assert len(rows) == len(written)
                for r, vec in zip(written, rows):
                    zero = not np.any(vec)
                    assert zero == (r["view_of"] is not None and not embed_views), (r["key"], modality)
        assert {m: manifest["index"][m]["n"] for m in ("image", "text")} == {"image": n * (1 + embed_views),
                                                                            "text": n * (1 + embed_views)}
        assert verify_output(str(out)) == []
    from mmdata.tools.reembed import reembed  # `mmdata embed` keeps the rule of the build it re-embeds

    reembed(str(tmp_path / "embed_False"), model="mmdata-tiny", pretrained="random", model_seed=1)
    written = [r for r in table(tmp_path / "embed_False") if r["status"] == "written"]
    files = sorted(glob.glob(f"{tmp_path}/embed_False/embeddings/image/*.npy"))
    rows = np.concatenate([np.load(f).astype(np.float32) for f in files])
    assert [not np.any(v) for v in rows] == [r["view_of"] is not None for r in written]


def test_view_keys_never_collide_with_real_keys(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for stem, color in (("cat", "red"), ("cat_v01", "blue")):
        Image.new("RGB", (80, 60), color).save(corpus / f"{stem}.jpg")
        (corpus / f"{stem}.txt").write_text(f"a {color} square")
    out = tmp_path / "o"
    run_build(corpus, out, workers=1, augment=SIZED, views=1)
    rows = {r["key"]: r for r in table(out)}
    assert len(rows) == 4 and rows["cat_v01"]["view_of"] is None and rows["cat_v01_v01"]["view_of"] == "cat_v01"
    (renamed,) = [k for k, r in rows.items() if r["view_of"] == "cat"]
    assert renamed.startswith("cat_v01_") and renamed != "cat_v01_v01"
    assert json.loads(raw_samples(out)[renamed]["json"])["key"] == renamed
    assert verify_output(str(out)) == []


def test_a_view_that_cannot_be_made_is_a_failed_row(corpus, tmp_path):
    """The boundary: an augmentation that raises on a bad sample records ``augment:<modality>``."""
    pytest.importorskip("soundfile")
    import soundfile as sf

    sf.write(tmp_path / "tone.wav", np.sin(np.arange(8000) / 5).astype(np.float32) * 0.3, 16000, subtype="PCM_16")
    (tmp_path / "tone.txt").write_text("a tone")
    config = load_config(input=str(tmp_path), out=str(tmp_path / "o"), require=["text"],
                         augment={"audio": [{"op": "gain"}], "image": [{"op": "grayscale"}]}, views=2)
    record = Record("tone", 1, sources={"audio": str(tmp_path / "tone.wav"), "text": str(tmp_path / "tone.txt")})
    (parent,) = RecordProcessor(config)(record, Timer())
    parent.members["flac"] = b"not a flac stream"
    samples = ViewMaker(config)([parent], Timer())
    assert [s.row["status"] for s in samples] == ["written", "failed", "failed"]
    assert {s.row["reason"] for s in samples[1:]} == {"augment:audio"}
    assert [s.row["key"] for s in samples[1:]] == ["tone_v01", "tone_v02"] and not samples[1].members
    (image,) = [f for f in glob.glob(corpus[0] + "/animals/horse.*") if not f.endswith((".txt", ".json"))]
    image_record = Record("pic", 2, sources={"image": image, "text": corpus[0] + "/animals/horse.txt"})
    (pic,) = RecordProcessor(config)(image_record, Timer())
    pic.image, pic.members["jpg"] = None, b"not a jpeg"  # the build writes jpg
    assert {s.row["reason"] for s in ViewMaker(config)([pic], Timer())[1:]} == {"augment:image"}


def test_a_bad_augment_config_is_one_line_and_exit_2(corpus, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"image": [{"op": "random_crop", "p": 1.0}]}))
    res = cli("build", "-i", corpus[0], "-o", str(tmp_path / "o"), "--augment", str(bad), "--views", "1", "--no-progress")
    assert_one_line_error(res, "random_crop", "random_resized_crop")
    bad.write_text(yaml.safe_dump({"image": [{"op": "horizontal_flip", "probability": 0.5}]}))
    assert_one_line_error(cli("build", "-i", corpus[0], "-o", str(tmp_path / "o"), "--augment", str(bad)), "probability")
    assert_one_line_error(cli("build", "-i", corpus[0], "-o", str(tmp_path / "o"), "--views", "2"), "augment")
    assert_one_line_error(cli("build", "-i", corpus[0], "-o", str(tmp_path / "o"), "--augment", str(tmp_path / "nope.yaml")),
                          "nope.yaml")
    assert not (tmp_path / "o").exists()


def test_cli_flags_make_views(corpus, tmp_path):
    res = cli("build", "-i", corpus[0], "-o", str(tmp_path / "o"), "--augment", EXAMPLE, "--views", "1", "--seed", "7",
              "--drop-originals", "--workers", "1", "--no-progress")
    assert res.returncode == 0, res.stderr
    manifest = json.load(open(tmp_path / "o" / "manifest.json"))
    assert manifest["config"]["views"] == 1 and manifest["config"]["augment_seed"] == 7
    assert manifest["config"]["keep_originals"] is False and manifest["config"]["augment"]["image"]
    assert "rows" in res.stdout and manifest["counts"]["written"] == corpus[1]["written"]


# ------------------------------------------------------------------------------------------ audio

AUDIO_AUG = {"audio": [{"op": "speed", "p": 1.0, "min_factor": 2.0, "max_factor": 2.0},
                       {"op": "gain", "p": 1.0, "min_db": -6, "max_db": -3}],
             "mel": [{"op": "time_mask", "p": 1.0, "max_width": 5}],
             "text": [{"op": "template", "p": 1.0, "templates": ["the sound of {}"]}]}


@pytest.fixture(scope="module")
def tone_corpus(tmp_path_factory):
    """Tones with captions, a recording cut into two segments by its .srt, a broken file."""
    sf = pytest.importorskip("soundfile")
    root, sr = tmp_path_factory.mktemp("tones"), 16000
    t = np.arange(sr) / sr
    for i, freq in enumerate((440, 660, 880)):
        sf.write(root / f"tone{i}.wav", (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, subtype="PCM_16")
        (root / f"tone{i}.txt").write_text(f"a {freq} Hz tone")
    t = np.arange(3 * sr) / sr
    sf.write(root / "talk.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), sr, subtype="PCM_16")
    (root / "talk.srt").write_text("1\n00:00:00,200 --> 00:00:01,200\nfirst part\n\n"
                                   "2\n00:00:01,500 --> 00:00:02,700\nsecond part\n")
    (root / "broken.wav").write_bytes(b"not a recording\n" * 8)
    (root / "broken.txt").write_text("a broken file")
    return str(root)


def build_tones(corpus, out, **kw):
    return run_build(corpus, out, require="audio,text", mel=True, audio_encoder="mel-stats", index=False,
                     augment=AUDIO_AUG, views=2, workers=1, **kw)


def test_audio_views_have_the_duration_gain_and_masks_the_ops_say(tone_corpus, tmp_path):
    import soundfile as sf

    from mmdata.transforms.audio import encode_flac

    out = tmp_path / "tones"
    manifest = build_tones(tone_corpus, out)
    originals = 3 + 2  # tones + segments
    assert manifest["counts"]["written"] == 3 * originals and manifest["reasons"]["failed"] == {"decode:audio": 1}
    rows = {r["key"]: r for r in table(out)}
    assert not any(r["view_of"] == "broken" for r in rows.values())
    got = raw_samples(out)
    views = [k for k in got if k[-4:-2] == "_v"]
    assert len(views) == 2 * originals
    for key in views:
        doc, parent = json.loads(got[key]["json"]), got[key[:-4]]
        y, sr = sf.read(io.BytesIO(got[key]["flac"]), dtype="float32")
        p, _ = sf.read(io.BytesIO(parent["flac"]), dtype="float32")
        assert abs(len(y) - len(p) / 2) <= 2 and rows[key]["duration"] == len(y) / sr  # speed 2.0
        (speed, gain) = doc["augment"]["audio"]
        assert speed == {"op": "speed", "factor": 2.0} and -6 <= gain["gain_db"] <= -3
        rms = np.sqrt(np.mean(y[200:-200] ** 2)) / np.sqrt(np.mean(p[400:-400] ** 2))
        assert abs(20 * np.log10(rms) - gain["gain_db"]) < 0.2
        mel = np.load(io.BytesIO(got[key]["mel.npy"]))
        assert mel.dtype == np.float16 and mel.shape[0] == 80
        assert mel.shape[1] < np.load(io.BytesIO(parent["mel.npy"])).shape[1]
        for start, width in doc["augment"]["mel"][0]["masks"]:
            assert len(np.unique(mel[:, start:start + width])) <= 1  # one fill value
        assert got[key]["txt"].decode() == "the sound of " + parent["txt"].decode()
        replayed = Augmenter(AUDIO_AUG).replay("audio", p, doc["augment"]["audio"], sr=sr)
        assert encode_flac(replayed, sr) == got[key]["flac"]  # the record is exactly what was applied
        assert doc["view_of"] == key[:-4] and rows[key]["parent_key"] == rows[key[:-4]]["parent_key"]
    assert rows["talk_s0000_v01"]["parent_key"] == "talk" and rows["talk_s0000_v01"]["view_of"] == "talk_s0000"
    written = [r for r in table(out) if r["status"] == "written"]
    audio = np.load(f"{out}/embeddings/audio/00000.npy").astype(np.float32)
    assert [not np.any(v) for v in audio] == [r["view_of"] is not None for r in written]
    assert verify_output(str(out)) == []


def test_audio_views_embedded_with_embed_views(tone_corpus, tmp_path):
    build_tones(tone_corpus, tmp_path / "a", embed_views=True)
    audio = np.load(f"{tmp_path}/a/embeddings/audio/00000.npy").astype(np.float32)
    assert len(audio) == 15 and np.all(np.any(audio != 0, axis=1))
    build_tones(tone_corpus, tmp_path / "b", embed_views=True)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")


def test_views_follow_a_segment_renamed_for_a_key_collision(tone_corpus, tmp_path):
    """A file named like a segment (talk_s0000.wav beside talk.wav + talk.srt): the segment gets a
    hash suffix, and its view takes the new key along."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    for name in ("talk.wav", "talk.srt", "tone0.wav"):
        (corpus / name).write_bytes(open(os.path.join(tone_corpus, name), "rb").read())
    (corpus / "tone0.wav").rename(corpus / "talk_s0000.wav")
    (corpus / "talk_s0000.txt").write_text("a record named like a segment")
    out = tmp_path / "o"
    run_build(corpus, out, require="audio,text", augment=AUDIO_AUG, views=1, workers=1)
    rows = {r["key"]: r for r in table(out)}
    (segment,) = [k for k, r in rows.items() if k.startswith("talk_s0000_") and r["parent_key"] == "talk" and not r["view"]]
    assert rows["talk_s0000_v01"]["view_of"] == "talk_s0000" and rows["talk_s0000_v01"]["parent_key"] is None
    assert rows[f"{segment}_v01"]["view_of"] == segment and rows[f"{segment}_v01"]["parent_key"] == "talk"
    assert json.loads(raw_samples(out)[f"{segment}_v01"]["json"])["view_of"] == segment
    assert len(rows) == 6 and verify_output(str(out)) == []
