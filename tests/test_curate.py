"""`mmdata curate`: a generated corpus with planted duplicates of each kind — a byte copy, a
re-encoded, a resized and a cropped photo, the same caption in other whitespace and case, the same
speech at another gain and sample rate, a repeated image+caption pair — each removed with a ledger
row naming the sample kept; no unique sample removed; filters each with their reason; the same
bytes on every engine and worker count."""
import glob
import io
import json
import os
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image
from typer.testing import CliRunner

from conftest import run_build
from mmdata.cli.main import app
from mmdata.curate import curate, load_curate_config
from mmdata.curate.semantic import dedup_cluster
from mmdata.errors import UserError
from mmdata.tools.verify import verify_output
from pipelines.demo_corpus import PHOTOS, skimage_photo

MODEL = dict(model="mmdata-tiny", pretrained="random", embedding_dtype="float32")
FOREIGN = {"coins.png": "de vieilles pièces de monnaie sur un fond sombre",
           "grass.png": "eine Nahaufnahme von frischem grünem Gras auf der Wiese",
           "gravel.png": "un primer plano de grava gris en el camino del parque"}


def jpeg(im, quality=90):
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def stem(name):
    return "u_" + name.split(".")[0].lower()


@pytest.fixture(scope="module")
def image_corpus(tmp_path_factory):
    """Twenty unique photos and captions (three not in English), plus the planted duplicates;
    returns (folder, {planted key: (method, kept key)})."""
    root = tmp_path_factory.mktemp("cur_images")

    def put(key, data, caption):
        (root / f"{key}.jpg").write_bytes(data)
        (root / f"{key}.txt").write_text(caption)

    for name, (_, caption) in PHOTOS.items():
        if name != "page.png":  # page's image carries a repeated caption below
            put(stem(name), jpeg(skimage_photo(name)), FOREIGN.get(name, caption))
    rocket = (root / "u_rocket.jpg").read_bytes()
    chelsea, coffee, astro = (skimage_photo(n).convert("RGB") for n in ("chelsea.png", "coffee.png", "astronaut.png"))
    w, h = astro.size
    planted = {
        "z_copy_rocket": ("exact_image", "u_rocket"),
        "z_reencoded_chelsea": ("phash", "u_chelsea"),
        "z_resized_coffee": ("phash", "u_coffee"),
        "z_cropped_astronaut": ("phash", "u_astronaut"),
        # a byte copy of the re-encoded cat: an exact duplicate of a sample that is itself removed, so
        # the ledger names the sample that stays
        "z_reencoded_chelsea_copy": ("exact_image", "u_chelsea"),
        "z_caption_page": ("exact_text", "u_chelsea"),
        "z_pair_moon": ("exact_image", "u_moon"),
    }
    put("z_copy_rocket", rocket, "the same rocket file under another name")
    put("z_reencoded_chelsea", jpeg(chelsea, quality=40), "the cat saved again at a low jpeg quality")
    put("z_reencoded_chelsea_copy", (root / "z_reencoded_chelsea.jpg").read_bytes(), "a copy of the low quality cat")
    put("z_resized_coffee", jpeg(coffee.resize((coffee.width * 2 // 3, coffee.height * 2 // 3), Image.LANCZOS)),
        "the coffee cup made smaller")
    put("z_cropped_astronaut", jpeg(astro.crop((w // 40, h // 40, w - w // 40, h - h // 40))),
        "the astronaut with a thin border cropped away")
    put("z_caption_page", jpeg(skimage_photo("page.png")), "  A Tabby CAT\tlooking to the   side ")
    put("z_pair_moon", (root / "u_moon.jpg").read_bytes(), "Craters on the grey surface of the MOON")
    return str(root), planted


@pytest.fixture(scope="module")
def image_build(image_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cur_images_out")
    run_build(image_corpus[0], out, workers=1, image_size=128, **MODEL)
    return str(out)


def rows(out):
    return {r["key"]: r for f in sorted(glob.glob(f"{out}/shards/*.parquet")) for r in pq.read_table(f).to_pylist()}


def run_curate(build, out, **kw):
    kw.setdefault("workers", 1)
    return curate(build, str(out), load_curate_config(**kw))


def removed(table):
    return {k: r["reason"] for k, r in table.items() if r["status"] != "written"}


def test_planted_image_and_caption_duplicates_removed_and_named(image_build, image_corpus, tmp_path):
    planted = image_corpus[1]
    manifest = run_curate(image_build, tmp_path / "c")
    assert verify_output(str(tmp_path / "c")) == []
    before, after = rows(image_build), rows(tmp_path / "c")
    assert sorted(before) == sorted(after)  # every input row once, same keys and ids
    assert all(after[k]["id"] == before[k]["id"] for k in before)
    expected = {key: f"duplicate:{method}:{kept}" for key, (method, kept) in planted.items()}
    assert removed(after) == expected  # every planted duplicate, and nothing unique
    for key, (_, kept) in planted.items():
        assert after[kept]["status"] == "written" and after[key]["duplicate_of"] == kept
    assert manifest["counts"] == {"inputs": 26, "written": 19, "filtered": 7, "failed": 0}
    assert manifest["curate"]["removed"] == {"duplicate:exact_image": 3, "duplicate:exact_text": 1, "duplicate:phash": 3}
    # the kept samples' members and embeddings are the input's, byte for byte
    index = json.load(open(tmp_path / "c" / "index" / "index_infos.json"))
    assert index["image"]["n"] == 19
    emb_in = np.concatenate([np.load(f) for f in sorted(glob.glob(f"{image_build}/embeddings/image/*.npy"))])
    in_rows = {k: r for k, r in before.items() if r["status"] == "written"}
    order_in = sorted(in_rows, key=lambda k: (in_rows[k]["row"], k))
    emb_out = np.concatenate([np.load(f) for f in sorted(glob.glob(f"{tmp_path}/c/embeddings/image/*.npy"))])
    kept_keys = [k for k in sorted(after) if after[k]["status"] == "written"]
    by_key_in = {}
    for f in sorted(glob.glob(f"{image_build}/shards/*.parquet")):
        t = [r for r in pq.read_table(f).to_pylist() if r["status"] == "written"]
        e = np.load(f.replace("shards", "embeddings/image").replace(".parquet", ".npy"))
        by_key_in.update({r["key"]: e[r["row"]] for r in t})
    assert np.array_equal(emb_out, np.stack([by_key_in[k] for k in kept_keys]))
    assert len(order_in) == len(emb_in)
    # the index holds the kept samples only: a search never returns a removed one
    from mmdata import Retriever

    hits = Retriever(str(tmp_path / "c"), device="cpu").search_key("u_chelsea", k=30, modality="image")
    assert {h.key for h in hits} == set(kept_keys) - {"u_chelsea"}


def test_repeated_pair_removed_by_semantic_pair_dedup(image_build, tmp_path):
    # exact and perceptual off: the repeated image+caption pair (same image bytes, caption in other
    # case) is found on the fused image+text embeddings alone
    run_curate(image_build, tmp_path / "c", exact=[], phash_max_distance=-1, semantic=["pair"], semantic_eps=1e-4)
    after = rows(tmp_path / "c")
    assert removed(after) == {"z_pair_moon": "duplicate:semantic_pair:u_moon"}
    assert after["z_pair_moon"]["duplicate_score"] >= 1 - 1e-4


def test_caption_filters_language_words_tokens(image_build, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = sorted({w for _, c in PHOTOS.values() for w in c.lower().split()})
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    run_curate(image_build, tmp_path / "c", exact=[], phash_max_distance=-1, languages=["en"],
               language_min_score=0.2, min_words=4, tokenizer=str(tmp_path / "tokenizer.json"), max_tokens=10,
               tokens_member=True)
    after = rows(tmp_path / "c")
    reasons = removed(after)
    for name in FOREIGN:
        assert reasons[stem(name)] == "filter:language", (name, after[stem(name)]["language"])
    assert {after[stem(n)]["language"] for n in FOREIGN} == {"fr", "de", "es"}
    # "a brick wall" is English with a confidence below 0.2; "the scikit-image logo" is too short
    assert reasons["u_brick"] == "filter:language" and after["u_brick"]["language_score"] < 0.2
    assert reasons["u_logo"] == "filter:words" and after["u_logo"]["words"] == 3
    for key, r in after.items():
        expected_tokens = len(Whitespace().pre_tokenize_str(r["caption"]))
        assert r["tokens"] == expected_tokens
        if key not in reasons:
            assert r["language"] == "en" and r["words"] >= 4 and r["tokens"] <= 10
        elif reasons[key] == "filter:tokens":
            assert r["tokens"] > 10 and r["language"] == "en"
    assert "filter:tokens" in reasons.values()
    # the kept samples carry the tokenizer's ids; they decode to the caption's words
    import webdataset as wds

    urls = sorted(glob.glob(f"{tmp_path}/c/shards/*.tar"))
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        ids = sample["llm_tokens.npy"]
        caption = after[sample["__key__"]]["caption"]
        assert ids.dtype == np.int32 and len(ids) == after[sample["__key__"]]["tokens"]
        assert tok.decode(ids.tolist()) == " ".join(w if w in words else "[UNK]"
                                                    for w, _ in Whitespace().pre_tokenize_str(caption))


def test_clip_score_filters(image_build, tmp_path):
    run_curate(image_build, tmp_path / "top", exact=[], phash_max_distance=-1, clip_top_fraction=0.5)
    top = rows(tmp_path / "top")
    kept = [r["clip_score"] for r in top.values() if r["status"] == "written"]
    cut = [r["clip_score"] for r in top.values() if r["reason"] == "filter:clip_top_fraction"]
    assert len(kept) == 13 and len(cut) == 13 and min(kept) >= max(cut)
    # the curated build has its report: the funnel names the curation reason, a plot shows the scores
    html = (tmp_path / "top" / "report.html").read_text()
    assert "filter:clip_top_fraction" in html and "<h3>clip_score (curation)</h3><svg" in html
    threshold = float(np.median([r["clip_score"] for r in top.values()]))
    run_curate(image_build, tmp_path / "min", exact=[], phash_max_distance=-1, clip_min=threshold)
    low = rows(tmp_path / "min")
    assert {k for k, r in low.items() if r["status"] != "written"} == {k for k, r in low.items() if r["clip_score"] < threshold}
    assert all(r["reason"] == "filter:clip_score" for r in low.values() if r["status"] != "written")


def test_decontamination_names_the_eval_sample(image_build, image_corpus, tmp_path):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    # an evaluation set holding two of the training captions (on other images)
    (eval_dir / "e_one.jpg").write_bytes(jpeg(skimage_photo("text.png")))
    (eval_dir / "e_one.txt").write_text(PHOTOS["clock_motion.png"][1])
    (eval_dir / "e_two.jpg").write_bytes(jpeg(skimage_photo("phantom.png")))
    (eval_dir / "e_two.txt").write_text(PHOTOS["horse.png"][1])
    run_build(eval_dir, tmp_path / "eval_out", workers=1, image_size=128, **MODEL)
    run_curate(image_build, tmp_path / "c", exact=[], phash_max_distance=-1, exclude_near=str(tmp_path / "eval_out"),
               exclude_modality="text", exclude_min_cosine=0.999)
    after = rows(tmp_path / "c")
    assert removed(after) == {"u_clock_motion": "decontaminate:e_one", "u_horse": "decontaminate:e_two"}
    assert after["u_clock_motion"]["decontaminate_cosine"] >= 0.999


def test_same_bytes_on_every_engine_and_worker_count(image_build, tmp_path):
    outs = {}
    engines = {"local1": dict(workers=1), "local2": dict(workers=2), "dask": dict(engine="dask", workers=2),
               "beam": dict(engine="beam", workers=1)}
    for name, kw in engines.items():
        run_curate(image_build, tmp_path / name, semantic=["pair"], **kw)
        outs[name] = tmp_path / name

    def files(out):
        found = {}
        for path in sorted(glob.glob(f"{out}/**/*", recursive=True)):
            rel = os.path.relpath(path, out)
            if os.path.isfile(path) and rel not in ("manifest.json", "index/index_infos.json", "report.html"):  # timings, the folder name
                found[rel] = open(path, "rb").read()
        return found

    ref = files(outs["local1"])
    assert "index/image.index" in ref and "shards/00000.tar" in ref
    for name, out in outs.items():
        assert files(out) == ref, name
        m = json.load(open(out / "manifest.json"))
        assert m["counts"] == json.load(open(outs["local1"] / "manifest.json"))["counts"]


def vectors_build(root, x):
    """A finished build of one shard whose samples are the rows of ``x`` as image embeddings (keys
    ``v00000``… in key order, a one-byte member each): what ``mmdata curate --semantic image`` reads."""
    import pyarrow as pa

    from mmdata.config import BuildConfig
    from mmdata.schema import SHARD_SCHEMA
    from mmdata.writers.tar import write_tar

    n = len(x)
    keys = [f"v{i:05d}" for i in range(n)]
    (root / "shards").mkdir(parents=True)
    (root / "embeddings" / "image").mkdir(parents=True)
    np.save(root / "embeddings" / "image" / "00000.npy", x.astype(np.float32))
    given = {"key": keys, "id": np.arange(n), "status": ["written"] * n, "warnings": [[]] * n,
             "row": np.arange(n, dtype=np.int32), "source_bytes": np.ones(n, np.int64)}
    pq.write_table(pa.table([pa.array(given[f.name], f.type) if f.name in given else pa.nulls(n, f.type)
                             for f in SHARD_SCHEMA], schema=SHARD_SCHEMA), root / "shards" / "00000.parquet")
    with open(root / "shards" / "00000.tar", "wb") as fh:
        write_tar(fh, ((k, {"txt": b"x"}) for k in keys))
    (root / "shards" / "sizes.json").write_text(json.dumps({"00000.tar": n}))
    config = BuildConfig(input=str(root), out=str(root), samples_per_shard=n, index=False, report=False)
    (root / "manifest.json").write_text(json.dumps({
        "config": config.model_dump(mode="json"), "config_hash": config.config_hash,
        "counts": {"records": n, "inputs": n, "written": n, "filtered": 0, "failed": 0},
        "embeddings": {"modalities": ["image"]}}))
    return keys


def test_semantic_dedup_on_clustered_vectors(tmp_path):
    """Planted near-duplicates among clustered vectors are found by `mmdata curate --semantic image`
    and their ledger names their original; no other vector is removed."""
    rng = np.random.default_rng(1)
    n, d = 3000, 32
    centres = rng.standard_normal((12, d))
    x = centres[rng.integers(0, 12, n)] + 1.0 * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src, dst = np.arange(0, 100), np.arange(n - 100, n)
    x[dst] = x[src] + 0.003 * rng.standard_normal((100, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    keys = vectors_build(tmp_path / "b", x)
    m = curate(str(tmp_path / "b"), str(tmp_path / "c"), load_curate_config(
        workers=1, exact=[], phash_max_distance=-1, semantic=["image"], semantic_eps=0.001, semantic_clusters=10))
    assert m["counts"]["inputs"] == n and m["counts"]["written"] == n - 100
    t = pq.read_table(tmp_path / "c" / "shards" / "00000.parquet").to_pydict()
    removed = [(k, r, s, o) for k, r, s, o in zip(t["key"], t["reason"], t["duplicate_score"], t["duplicate_of"])
               if r is not None]
    assert all(r == f"duplicate:semantic_image:{o}" for _, r, _, o in removed)
    assert {frozenset((k, o)) for k, _, _, o in removed} == {frozenset((keys[a], keys[b])) for a, b in zip(src, dst)}
    assert all(s >= 0.999 for _, _, s, _ in removed)


def test_dedup_cluster_keeps_the_first_ranked():
    """Within a group, the sample kept is the one ranked first; chains name the first."""
    rows_ = np.stack([[1, 0], [0.99999, 0.0045], [0.9999, 0.014]]).astype(np.float32)
    rows_ /= np.linalg.norm(rows_, axis=1, keepdims=True)
    d_, k_, _ = dedup_cluster(rows_, 0.9999)
    assert d_.tolist() == [1, 2] and k_.tolist() == [0, 0]


def test_bad_inputs(image_build, tmp_path):
    runner = CliRunner()
    not_build = tmp_path / "nothing"
    not_build.mkdir()
    r = runner.invoke(app, ["curate", "--workers", "1", str(not_build), "--out", str(tmp_path / "o1")])
    assert r.exit_code == 2 and "not a finished mmdata build" in r.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["curate", "--workers", "1", image_build, "--out", str(busy)])
    assert r.exit_code == 2 and "not empty" in r.output
    r = runner.invoke(app, ["curate", "--workers", "1", image_build, "--out", str(busy), "--overwrite"])
    assert r.exit_code == 2 and "not an mmdata output" in r.output and (busy / "notes.txt").exists()
    r = runner.invoke(app, ["curate", "--workers", "1", image_build, "--out", str(tmp_path / "o2"), "--max-tokens", "5"])
    assert r.exit_code == 2 and "need --tokenizer" in r.output
    r = runner.invoke(app, ["curate", "--workers", "1", image_build, "--out", str(tmp_path / "o3"), "--tokenizer", str(tmp_path / "no.json")])
    assert r.exit_code == 2 and "cannot load tokenizer" in r.output
    r = runner.invoke(app, ["curate", "--workers", "1", image_build, "--out", str(tmp_path / "o4"), "--semantic", "audio"])
    assert r.exit_code == 2 and "no audio embeddings" in r.output
    cfg = tmp_path / "c.yaml"
    cfg.write_text("curate:\n  semantic_eps: 2\n")
    r = runner.invoke(app, ["curate", "--workers", "1", image_build, "--out", str(tmp_path / "o5"), "--config", str(cfg)])
    assert r.exit_code == 2 and "semantic_eps" in r.output
    with pytest.raises(UserError):
        run_curate(image_build, image_build)
    # the CLI's happy path, then a second run into the same folder needs --overwrite
    r = runner.invoke(app, ["curate", "--workers", "1", image_build, "--out", str(tmp_path / "ok")])
    assert r.exit_code == 0, r.output
    assert "removed      3  duplicate:phash" in r.output
    r = runner.invoke(app, ["curate", "--workers", "1", image_build, "--out", str(tmp_path / "ok")])
    assert r.exit_code == 2
    r = runner.invoke(app, ["curate", "--workers", "1", image_build, "--out", str(tmp_path / "ok"), "--overwrite"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["verify", str(tmp_path / "ok")])
    assert r.exit_code == 0, r.output


SENTENCES = [("en", "The birch canoe slid on the smooth planks."), ("en+f3", "Glue the sheet to the dark blue background."),
             ("en+m3", "It is easy to tell the depth of a well."), ("en-us", "These days a chicken leg is a rare dish."),
             ("en+f2", "Rice is often served in round bowls."), ("en+m1", "The juice of lemons makes fine punch."),
             ("en+f4", "The box was thrown beside the parked truck."), ("en+m2", "The hogs were fed chopped corn and garbage."),
             ("en+f1", "Four hours of steady work faced us.")]


def srt_time(t):
    ms = int(round(t * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


@pytest.fixture(scope="module")
def audio_build(tmp_path_factory):
    """Five spoken sentences (espeak-ng); the first again at another gain and sample rate, the second
    copied byte for byte; near silence, a very quiet sentence, a clipped one. Built with mel-stats."""
    import soxr

    if not shutil.which("espeak-ng"):
        pytest.skip("needs espeak-ng (apt-get install espeak-ng)")
    root, tmp = tmp_path_factory.mktemp("cur_audio"), tmp_path_factory.mktemp("cur_audio_parts")

    def speak(i):
        voice, text = SENTENCES[i]
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(tmp / f"s{i}.wav"), text], check=True)
        x, sr = sf.read(tmp / f"s{i}.wav", dtype="float32")
        return x / np.abs(x).max(), sr

    def put(key, x, sr, caption):
        sf.write(root / f"{key}.wav", x, sr, subtype="PCM_16")
        (root / f"{key}.txt").write_text(caption)

    for i in range(5):
        x, sr = speak(i)
        put(f"a_speech{i}", 0.5 * x, sr, f"spoken sentence number {i}")
    x, sr = speak(0)
    put("z_gain_speech0", soxr.resample(0.15 * x, sr, 44100), 44100, "the first sentence again, quieter, at 44.1 kHz")
    shutil.copy(root / "a_speech1.wav", root / "z_copy_speech1.wav")
    (root / "z_copy_speech1.txt").write_text("the second sentence copied under another name")
    rng = np.random.default_rng(0)
    put("b_silence", (1e-4 * rng.standard_normal(32000)).astype(np.float32), 16000, "two seconds of near silence")
    x, sr = speak(5)
    put("b_quiet", 0.003 * x, sr, "a very quiet sentence")
    x, sr = speak(6)
    put("b_clipped", np.clip(6 * x, -1, 1), sr, "a sentence played far too loud")
    # a recording split by its transcript into two segments: they share the recording's audio_sha256
    # and are not duplicates of each other
    (a, sr), (b, _) = speak(7), speak(8)
    gap = np.zeros(int(0.3 * sr), np.float32)
    put("c_talk", 0.5 * np.concatenate([gap, a, gap, b, gap]), sr, "")
    (root / "c_talk.txt").unlink()
    t1, t2 = len(gap) / sr, (2 * len(gap) + len(a)) / sr
    (root / "c_talk.srt").write_text(f"1\n{srt_time(t1)} --> {srt_time(t1 + len(a) / sr)}\n{SENTENCES[7][1]}\n\n"
                                     f"2\n{srt_time(t2)} --> {srt_time(t2 + len(b) / sr)}\n{SENTENCES[8][1]}\n")
    out = tmp_path_factory.mktemp("cur_audio_out")
    run_build(root, out, workers=1, require=["audio", "text"], audio_encoder="mel-stats")
    return str(out)


def test_planted_audio_duplicates(audio_build, tmp_path):
    run_curate(audio_build, tmp_path / "c", semantic=["audio"], semantic_eps_by_modality={"audio": 0.002})
    assert verify_output(str(tmp_path / "c")) == []
    after = rows(tmp_path / "c")
    gone = removed(after)
    assert gone.pop("z_copy_speech1") == "duplicate:exact_audio:a_speech1"
    # the same speech at another gain and rate: one of the two stays (the one nearer its k-means
    # centre) and the other's ledger names it
    assert len(gone) == 1
    (key, reason), = gone.items()
    other = ({"a_speech0", "z_gain_speech0"} - {key}).pop()
    assert reason == f"duplicate:semantic_audio:{other}" and after[key]["duplicate_score"] >= 0.998
    assert after["c_talk_s0000"]["status"] == after["c_talk_s0001"]["status"] == "written"
    assert after["c_talk_s0000"]["audio_sha256"] == after["c_talk_s0001"]["audio_sha256"]
    assert json.load(open(tmp_path / "c" / "index" / "index_infos.json"))["audio"]["n"] == 10


def test_audio_filters_speech_loudness_clipping(audio_build, tmp_path):
    run_curate(audio_build, tmp_path / "c", exact=[], min_speech_ratio=0.3, min_loudness=-45, max_clipping=0.01)
    after = rows(tmp_path / "c")
    assert removed(after) == {"b_silence": "filter:speech_ratio", "b_quiet": "filter:loudness", "b_clipped": "filter:clipping"}
    assert after["b_quiet"]["loudness"] < -45 < after["z_gain_speech0"]["loudness"]
    assert after["b_clipped"]["clipping"] > 0.01 and after["a_speech0"]["clipping"] == 0
    assert after["b_silence"]["speech_ratio"] < 0.3
    assert all(after[f"a_speech{i}"]["speech_ratio"] > 0.5 for i in range(5))


def test_augmented_views_are_not_duplicates_of_their_original(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("chelsea.png", "coffee.png", "moon.png"):
        (corpus / f"{stem(name)}.jpg").write_bytes(jpeg(skimage_photo(name)))
        (corpus / f"{stem(name)}.txt").write_text(PHOTOS[name][1])
    augment = {"image": [{"op": "horizontal_flip", "p": 1.0}], "text": [{"op": "template", "p": 1.0, "templates": ["{}"]}]}
    run_build(corpus, tmp_path / "out", workers=1, image_size=64, augment=augment, views=1)
    before = rows(tmp_path / "out")
    views = [k for k, r in before.items() if r["view_of"]]
    assert len(views) == 3 and all(before[k]["image_sha256"] == before[before[k]["view_of"]]["image_sha256"] for k in views)
    run_curate(str(tmp_path / "out"), tmp_path / "c")
    assert removed(rows(tmp_path / "c")) == {}
    assert verify_output(str(tmp_path / "c")) == []


def test_an_undecodable_member_fails_only_its_sample(image_build, tmp_path):
    from mmdata.writers.tar import read_tar_samples, write_tar

    broken = tmp_path / "broken"
    shutil.copytree(image_build, broken)
    tar = sorted(glob.glob(f"{broken}/shards/*.tar"))[0]
    samples = read_tar_samples(open(tar, "rb"))
    victim = samples[0][0]
    samples[0][1]["jpg"] = b"not a jpeg at all"
    with open(tar, "wb") as fh:
        write_tar(fh, samples)
    manifest = run_curate(str(broken), tmp_path / "c")
    after = rows(tmp_path / "c")
    assert after[victim]["status"] == "failed" and after[victim]["reason"] == "curate:UnidentifiedImageError"
    assert manifest["counts"]["failed"] == 1 and verify_output(str(tmp_path / "c")) == []


def test_every_option_is_a_flag():
    import inspect

    from mmdata.cli.curate import curate as command
    from mmdata.curate import CurateConfig

    flags = set(inspect.signature(command).parameters) - {"build", "out", "config"}
    # per-modality eps is a mapping: only the YAML file sets it
    assert flags == set(CurateConfig.model_fields) - {"semantic_eps_by_modality"}


def test_a_curate_section_of_the_build_config_runs_after_the_build(image_corpus, image_build, tmp_path):
    import yaml

    cfg = tmp_path / "build.yaml"
    section = {"out": str(tmp_path / "curated"), "semantic": ["pair"], "semantic_eps": 1e-4}
    cfg.write_text(yaml.safe_dump({"model": "mmdata-tiny", "pretrained": "random", "embedding_dtype": "float32",
                                   "image_size": 128, "samples_per_shard": 8, "workers": 1, "curate": section}))
    args = ["build", "--input", image_corpus[0], "--out", str(tmp_path / "out"), "--config", str(cfg), "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "removed      3  duplicate:phash" in r.output
    # the section writes another folder: the build's own output and config hash are those of a build without it
    built = json.load(open(tmp_path / "out" / "manifest.json"))
    assert built["config_hash"] == json.load(open(f"{image_build}/manifest.json"))["config_hash"]
    assert removed(rows(tmp_path / "curated")) == removed(rows_of_default_curation(image_build, tmp_path))
    assert verify_output(str(tmp_path / "curated")) == []
    # a re-run resumes the build and replaces the curated folder
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "already committed" in r.output, r.output
    # a bad section stops the build before it starts
    for bad, message in (({"semantic": ["pair"]}, "needs out:"), ({"out": "x", "semantic_epz": 1}, "semantic_epz")):
        cfg.write_text(yaml.safe_dump({"curate": bad}))
        r = CliRunner().invoke(app, ["build", "--input", image_corpus[0], "--out", str(tmp_path / "never"),
                                     "--config", str(cfg)])
        assert r.exit_code == 2 and message in r.output and not (tmp_path / "never").exists()


def rows_of_default_curation(build, tmp_path):
    run_curate(build, tmp_path / "reference", semantic=["pair"], semantic_eps=1e-4)
    return rows(tmp_path / "reference")
