"""`mmdata search --audio` (similar sounds) and `--text … --modality audio` (CLAP's text tower), on
mel-stats and tiny random CLAP builds; the query audio goes through the build's own processing;
bad queries exit 2 with one line. Also ``from mmdata import Retriever`` and a light ``import mmdata``."""
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from conftest import run_build
from typer.testing import CliRunner

from mmdata.cli.main import app
from mmdata.errors import UserError

MMDATA = [sys.executable, "-m", "mmdata"]
FREQS = (220, 440, 880, 1760, 3520)


def sound(i, sr=24000, seconds=1.0, channels=1, lead=0.3):
    """Sound i: a tone (a different pitch each), a little seeded noise, and leading silence."""
    t = np.arange(int(sr * seconds)) / sr
    x = 0.4 * np.sin(2 * np.pi * FREQS[i] * t) + 0.02 * np.random.default_rng(i).standard_normal(len(t))
    x = np.concatenate([np.zeros(int(sr * lead)), x]).astype(np.float32)
    return x if channels == 1 else np.stack([x] * channels, axis=1)


def make_corpus(root):
    root.mkdir()
    for i in range(len(FREQS)):
        sf.write(root / f"snd_{i}.wav", sound(i), 24000, subtype="PCM_16")
        (root / f"snd_{i}.txt").write_text(f"a tone at {FREQS[i]} Hz")
    return root


def search(*args):
    return CliRunner().invoke(app, ["search", *map(str, args)])


def hits(result):
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def mel_built(tmp_path_factory):
    """A mel-stats build whose audio settings a query must follow: 22.05 kHz, silence trimmed,
    peak-normalised, clips under 0.2 s filtered."""
    tmp = tmp_path_factory.mktemp("mel")
    corpus = make_corpus(tmp / "in")
    manifest = run_build(corpus, tmp / "out", require=["audio", "text"], audio_encoder="mel-stats", workers=1,
                         sample_rate=22050, trim_silence=True, normalize="peak", min_duration=0.2)
    assert manifest["counts"]["written"] == len(FREQS) and "audio" in manifest["index"]
    return corpus, str(tmp / "out")


@pytest.fixture(scope="module")
def tiny_clap_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_audio_encoders import write_tiny_clap

    from mmdata.encoders import audio as E

    yield write_tiny_clap(tmp_path_factory.mktemp("tiny-clap"))
    E.clear_cache()


@pytest.fixture(scope="module")
def clap_built(tmp_path_factory, tiny_clap_dir):
    tmp = tmp_path_factory.mktemp("clap")
    corpus = make_corpus(tmp / "in")
    manifest = run_build(corpus, tmp / "out", require=["audio", "text"], audio_encoder="clap", clap_model=tiny_clap_dir,
                         device="cpu", workers=1)
    assert manifest["embeddings"]["audio_encoder"]["name"] == "clap" and "audio" in manifest["index"]
    return corpus, str(tmp / "out")


# ---------------------------------------------------------------------------------- mel-stats


@pytest.mark.parametrize("i", range(len(FREQS)))
def test_each_corpus_sound_finds_itself_first(mel_built, i):
    corpus, out = mel_built
    got = hits(search(out, "--audio", corpus / f"snd_{i}.wav", "-k", "3", "--json"))
    assert len(got) == 3 and got[0]["key"] == f"snd_{i}" and got[0]["score"] > 0.999
    assert got[0]["rank"] == 1 and got[0]["caption"] == f"a tone at {FREQS[i]} Hz" and got[0]["shard"] == "00000.tar"


def test_the_query_is_processed_as_the_build_processes_a_clip(mel_built):
    from mmdata import Retriever

    corpus, out = mel_built
    r = Retriever(out)
    y, sr = r.audio_query(str(corpus / "snd_2.wav"))
    assert sr == 22050 and y.ndim == 1  # the build's rate, downmixed
    assert abs(len(y) / sr - 1.0) < 0.05  # the 0.3 s of leading silence trimmed, as in the build
    assert abs(float(np.max(np.abs(y))) - 10 ** (-1 / 20)) < 1e-3  # peak-normalised to -1 dBFS
    query = r.audio_encoder().encode_audio([(y, sr)])[0]
    np.testing.assert_allclose(query, r.embedding_of("snd_2", "audio"), atol=2e-3)  # float16 rows


def test_another_rate_and_channel_count_of_a_sound_finds_it(mel_built, tmp_path):
    _, out = mel_built
    sf.write(tmp_path / "q.flac", sound(3, sr=48000, channels=2), 48000, subtype="PCM_24")
    got = hits(search(out, "--audio", tmp_path / "q.flac", "--modality", "audio", "-k", "1", "--json"))
    assert [h["key"] for h in got] == ["snd_3"]


def test_plain_output_columns(mel_built):
    corpus, out = mel_built
    result = search(out, "--audio", corpus / "snd_0.wav", "-k", "2")
    assert result.exit_code == 0, result.output
    rank, score, key, shard, *caption = result.stdout.splitlines()[0].split()
    assert (rank, key, shard, " ".join(caption)) == ("1", "snd_0", "00000.tar", "a tone at 220 Hz")
    assert float(score) > 0.999


def test_text_on_a_mel_stats_build_is_refused_in_one_line(mel_built):
    _, out = mel_built
    res = subprocess.run(MMDATA + ["search", out, "--text", "dog barking", "--modality", "audio"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [
        "error: mel-stats has no text tower; query the audio index with --audio, --key or --embedding"]


def test_text_without_modality_searches_the_image_index_which_is_not_there(mel_built):
    _, out = mel_built
    result = search(out, "--text", "dog barking")
    assert result.exit_code == 2 and "not indexed" in result.output and "audio" in result.output


def write_truncated_wav(path):
    sf.write(path, sound(0), 24000, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name,make,fragment", [
    ("zero.wav", lambda p: p.write_bytes(b""), "empty:audio"),
    ("truncated.wav", write_truncated_wav, "truncated:audio"),
    ("notes.wav", lambda p: p.write_text("this is a text file, not a recording\n" * 5), "text, not audio"),
    ("noise.wav", lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "decode:audio"),
    ("short.wav", lambda p: sf.write(p, sound(1, seconds=0.05, lead=0), 24000), "duration:too_short"),
    ("missing.wav", None, "cannot read query audio"),
])
def test_bad_query_audio_exits_2(mel_built, tmp_path, name, make, fragment):
    _, out = mel_built
    path = tmp_path / name
    if make:
        make(path)
    result = search(out, "--audio", path)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0] and str(path) in lines[0], lines


def test_bad_query_audio_through_the_real_cli(mel_built, tmp_path):
    _, out = mel_built
    (tmp_path / "fake.wav").write_text("hello\n")
    res = subprocess.run(MMDATA + ["search", out, "--audio", str(tmp_path / "fake.wav")], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,fragment", [
    (["--image", "x.jpg", "--modality", "audio"], "cannot search the audio index"),
    (["--audio", "x.wav", "--modality", "image"], "audio index only"),
    (["--audio", "x.wav", "--pretrained", "laion2b_s34b_b79k"], "--pretrained"),
    (["--audio", "x.wav", "--model", "laion/clap-htsat-unfused"], "built with mel-stats"),
    (["--audio", "x.wav", "--text", "y"], "exactly one of --text, --image, --key, --embedding, --audio"),
])
def test_mismatched_queries_exit_2(mel_built, args, fragment):
    _, out = mel_built
    result = search(out, *args)
    assert result.exit_code == 2 and fragment in result.output, result.output


def test_key_and_embedding_queries_on_the_audio_index(mel_built):
    _, out = mel_built
    got = hits(search(out, "--key", "snd_1", "--modality", "audio", "-k", "2", "--json"))
    assert len(got) == 2 and "snd_1" not in [h["key"] for h in got]


# --------------------------------------------------------------------------------------- CLAP


def test_text_queries_the_audio_index_with_clap_text_tower(clap_built, tiny_clap_dir):
    from mmdata import Retriever
    from mmdata.encoders.audio import ClapEncoder

    _, out = clap_built
    got = hits(search(out, "--text", "dog barking", "--modality", "audio", "-k", "3", "--json"))
    assert len(got) == 3 and len({h["key"] for h in got}) == 3
    r = Retriever(out)
    api = r.search_text("dog barking", k=3, modality="audio")
    assert [h.to_dict() for h in api] == got
    expected = ClapEncoder(tiny_clap_dir, device="cpu").encode_texts(["dog barking"])[0]
    same = r.search_embedding(expected, k=3, modality="audio")
    assert [(h.key, h.score) for h in same] == [(h.key, h.score) for h in api]
    for h in api:  # the flat index scores are inner products with that very text vector
        assert abs(h.score - float(r.embedding_of(h.key, "audio") @ expected)) < 2e-3
    # open_clip is not involved: this build has no open_clip model at all
    with pytest.raises(UserError, match="no embedding model"):
        r.encoder()


def test_clap_audio_query_finds_the_sound_itself(clap_built):
    corpus, out = clap_built
    got = hits(search(out, "--audio", corpus / "snd_4.wav", "-k", "2", "--json"))
    assert got[0]["key"] == "snd_4" and got[0]["score"] > 0.99


def test_clap_model_must_match(clap_built, tiny_clap_dir):
    _, out = clap_built
    result = search(out, "--text", "x", "--modality", "audio", "--model", "laion/clap-htsat-unfused")
    assert result.exit_code == 2 and f"built with CLAP {tiny_clap_dir}" in result.output
    result = search(out, "--text", "x", "--modality", "audio", "--model", tiny_clap_dir, "-k", "1")
    assert result.exit_code == 0, result.output


def test_reembed_keeps_the_audio_encoder_and_index(tmp_path):
    """`mmdata embed` replaces the open_clip embeddings; the audio ones and their encoder stay searchable."""
    from PIL import Image

    corpus = make_corpus(tmp_path / "in")
    for i in range(len(FREQS)):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(corpus / f"snd_{i}.jpg")
    Image.fromarray(np.full((32, 32, 3), 250, np.uint8)).save(corpus / "silent_pic.jpg")  # no sound
    (corpus / "silent_pic.txt").write_text("a picture without a sound")
    run_build(corpus, tmp_path / "out", audio_encoder="mel-stats", image_size=32, workers=1)
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "out"), "--model", "mmdata-tiny", "--pretrained", "random"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["embeddings"]["audio_encoder"]["name"] == "mel-stats"
    assert {"image", "text", "audio"} <= set(manifest["index"])
    got = hits(search(tmp_path / "out", "--audio", corpus / "snd_2.wav", "-k", "1", "--json"))
    assert got[0]["key"] == "snd_2" and got[0]["score"] > 0.999
    assert hits(search(tmp_path / "out", "--text", "a tone", "-k", "2", "--json"))  # open_clip → image index
    assert hits(search(tmp_path / "out", "--key", "silent_pic", "-k", "2", "--json"))  # its image neighbours
    result = search(tmp_path / "out", "--key", "silent_pic", "--modality", "audio")
    assert result.exit_code == 2 and "has no audio embedding" in result.output, result.output


# ------------------------------------------------------------------------------------ package


def test_retriever_is_exported_lazily():
    code = ("import sys, mmdata; heavy = [m for m in ('faiss', 'torch', 'pyarrow', 'PIL', 'numpy') if m in sys.modules]; "
            "assert not heavy, heavy; from mmdata import Retriever, Hit; "
            "from mmdata.search import Retriever as R; assert Retriever is R and 'Retriever' in dir(mmdata)")
    subprocess.run([sys.executable, "-c", code], check=True)
    import mmdata

    with pytest.raises(AttributeError):
        mmdata.NoSuchThing  # noqa: B018
