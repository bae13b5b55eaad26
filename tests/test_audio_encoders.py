"""Audio encoders: model-free mel statistics, and CLAP through transformers with a tiny random model
saved to disk (no hub here), loaded through the same code a real checkpoint would use."""
import json

import numpy as np
import pytest

from mmdata.encoders import audio as E
from mmdata.encoders.audio import ClapEncoder, MelStatsEncoder
from mmdata.errors import UserError


def tone(freq, sr=16000, seconds=1.0, amp=0.5, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return x if channels == 1 else np.stack([x] * channels, axis=1)


def noise(seed, sr=16000, seconds=1.0, amp=0.1):
    return (amp * np.random.default_rng(seed).standard_normal(int(sr * seconds))).astype(np.float32)


def cos(a, b):
    return float(np.dot(a, b))


# ------------------------------------------------------------------------------------ mel-stats


def test_mel_stats_shape_norm_and_honest_name():
    enc = MelStatsEncoder(n_mels=32)
    enc.setup()
    out = enc([(tone(440), 16000), (noise(0), 16000), (tone(440, sr=44100, channels=2), 44100)])
    assert out.shape == (3, enc.dim) == (3, 96) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    info = enc.info()
    assert info["description"] == "mel-stats: pooled log-mel statistics, not a learned embedding"
    assert info["dim"] == 96 and info["params"]["n_mels"] == 32


def test_mel_stats_neighbours_are_spectrally_alike():
    enc = MelStatsEncoder()
    a440, a440_loud_stereo_44k, a2000, white = enc([
        (tone(440), 16000), (tone(440, sr=44100, amp=0.9, channels=2), 44100),
        (tone(2000), 16000), (noise(1), 16000)])
    assert cos(a440, a440_loud_stereo_44k) > 0.99  # rate, gain and channel count do not matter
    assert cos(a440, a440_loud_stereo_44k) > cos(a440, a2000) + 0.1
    assert cos(a440, a440_loud_stereo_44k) > cos(a440, white) + 0.1


def test_mel_stats_is_deterministic_and_handles_edge_cases():
    enc = MelStatsEncoder(deltas=False)
    items = [(noise(3), 16000), (np.zeros(8000, np.float32), 16000), (tone(300, seconds=0.005), 16000)]
    a, b = enc(items), enc(list(reversed(items)))[::-1]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a[1], np.full(enc.dim, 1 / np.sqrt(enc.dim), np.float32), rtol=1e-6)  # silence
    assert np.isfinite(a).all() and enc([]).shape == (0, enc.dim)


# ----------------------------------------------------------------------------------------- CLAP


def write_tiny_clap(folder, seed=0):
    """A randomly initialised CLAP small enough for CPU tests, with an offline byte-level BPE tokenizer."""
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "o u", "Ġ s"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = RobertaTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    # 2 s at 48 kHz, hop 480: 201 frames <= spec_size * (spec_size // num_mel_bins) = 256
    extractor = ClapFeatureExtractor(feature_size=16, sampling_rate=48000, hop_length=480, max_length_s=2,
                                     fft_window_size=1024, truncation="fusion", padding="repeatpad")
    config = ClapConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=40),
        audio_config=dict(num_mel_bins=16, spec_size=64, window_size=4, patch_size=2, patch_stride=2,
                          hidden_size=32, patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2],
                          num_hidden_layers=2, enable_fusion=True),
        projection_dim=16)
    torch.manual_seed(seed)
    ClapModel(config).save_pretrained(folder)
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory):
    pytest.importorskip("transformers")
    path = write_tiny_clap(tmp_path_factory.mktemp("tiny-clap"))
    yield path
    E.clear_cache()


@pytest.fixture
def clap(tiny_clap):
    enc = ClapEncoder(tiny_clap, device="cpu", batch_size=4)
    enc.setup()
    return enc


def test_clap_audio_embeddings(clap):
    items = [(tone(440), 16000), (tone(440, sr=44100, channels=2), 44100), (noise(2, sr=48000, seconds=5.0), 48000),
             (tone(1000, sr=22050, seconds=0.3), 22050), (noise(4), 16000)]
    out = clap.encode_audio(items)
    assert out.shape == (5, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert cos(out[0], out[1]) > 0.99  # same tone at another rate and channel count
    # deterministic, and independent of batch composition (CLAP's extractor would randomise both)
    again = np.concatenate([clap.encode_audio([it]) for it in reversed(items)])[::-1]
    np.testing.assert_allclose(out, again, atol=1e-5)
    assert clap(items[:2]).shape == (2, 16) and clap.encode_audio([]).shape == (0, 16)


def test_clap_long_clips_are_cut_to_the_head(clap):
    head = noise(5, sr=48000, seconds=2.0)
    longer = np.concatenate([head, noise(6, sr=48000, seconds=3.0)])
    a, b = clap.encode_audio([(head, 48000), (longer, 48000)])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_clap_text_embeddings_share_the_space(clap):
    texts = ["the sound of a dog", "rain on a tin roof", "", "a " * 200]  # empty and over-long texts too
    out = clap.encode_texts(texts)
    assert out.shape == (4, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(clap.encode_texts(texts[:1]), out[:1], atol=1e-5)
    scores = clap.encode_audio([(tone(440), 16000)]) @ out.T  # the retrieval use: one space
    assert scores.shape == (1, 4) and np.all(np.abs(scores) <= 1.0 + 1e-5)


def test_clap_info_and_model_cache(clap, tiny_clap):
    info = clap.info()
    assert info["dim"] == 16 and info["sample_rate"] == 48000 and info["max_length_s"] == 2.0
    assert info["model"] == tiny_clap and info["device"] == "cpu" and info["precision"] == "fp32"
    other = ClapEncoder(tiny_clap, device="cpu")
    other.setup()
    assert other._model is clap._model  # loaded once per process


def test_clap_bf16_on_cpu(tiny_clap):
    enc = ClapEncoder(tiny_clap, device="cpu", precision="bf16")
    out = enc.encode_audio([(tone(440), 16000)])
    assert out.dtype == np.float32 and abs(np.linalg.norm(out) - 1) < 1e-5


def test_clap_oom_halves_the_batch(clap, monkeypatch):
    import torch

    seen = []
    real = clap._model.get_audio_features

    def flaky(input_features, is_longer):
        seen.append(len(input_features))
        if len(input_features) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(input_features=input_features, is_longer=is_longer)

    expected = clap.encode_audio([(noise(i), 16000) for i in range(3)])
    monkeypatch.setattr(clap._model, "get_audio_features", flaky)
    out = clap.encode_audio([(noise(i), 16000) for i in range(3)])
    assert seen == [3, 2, 1, 1, 1]  # batch 4 (3 rows here) -> 2 -> 1, kept for the rest
    assert clap.batch_size == 1
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_clap_hub_id_offline_fails_fast_naming_the_remedy(monkeypatch):
    import time

    from transformers import ClapModel, ClapProcessor  # noqa: F401 — before the clock: a cold import of
    # transformers took 18 s on a loaded 2-core machine when this test ran first; the bound is on retries

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        ClapEncoder("laion/clap-htsat-unfused", device="cpu").setup()
    message = str(e.value)
    assert "\n" not in message and "laion/clap-htsat-unfused" in message
    assert "HF_HUB_OFFLINE" in message and "save_pretrained" in message
    assert time.perf_counter() - start < 10  # no half-minute of retries


def test_clap_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(E, "_hub_reachable", lambda: False)
    with pytest.raises(UserError, match="unreachable"):
        ClapEncoder("laion/clap-htsat-unfused", device="cpu").setup()


def test_clap_missing_folder_is_a_user_error():
    with pytest.raises(UserError, match="does not exist.*save_pretrained"):
        ClapEncoder("/nonexistent/clap-checkpoint", device="cpu").setup()


def test_clap_folder_without_processor_is_a_user_error(tmp_path, tiny_clap):
    import shutil

    for f in ("config.json", "model.safetensors"):
        shutil.copy(f"{tiny_clap}/{f}", tmp_path / f)
    with pytest.raises(UserError, match="cannot load CLAP model from.*save_pretrained"):
        ClapEncoder(str(tmp_path), device="cpu").setup()


def test_clap_cuda_without_gpu_is_a_user_error(tiny_clap):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError):
        ClapEncoder(tiny_clap, device="cuda")
