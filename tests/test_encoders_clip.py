"""The open_clip encoder stage, through the real loading code with the tiny config (no model hub)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mmdata.encoders import loading  # noqa: E402
from mmdata.encoders.clip import ClipEncoder, pipelined  # noqa: E402
from mmdata.encoders.device import run_with_oom_backoff  # noqa: E402
from mmdata.errors import UserError  # noqa: E402

TINY = "mmdata-tiny"
CAPTIONS = ["a photo of a cat", "a red bus", "", "ünïcödé text ✓", "a very long caption " * 40]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No hub, and an empty HF cache, whatever the machine has downloaded."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def images(n=7, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(64, 48), (31, 90), (200, 120), (32, 32), (17, 17), (128, 64), (45, 300)]
    return [Image.fromarray(rng.integers(0, 256, (sizes[i % 7][1], sizes[i % 7][0], 3), dtype=np.uint8))
            for i in range(n)]


def tiny(**kw):
    kw.setdefault("pretrained", None)
    kw.setdefault("batch_size", 3)
    return ClipEncoder(TINY, **kw)


def assert_one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg and len(msg) < 500, msg
    for needle in needles:
        assert needle in msg, msg


# -- loading ------------------------------------------------------------------------------------


def test_tiny_config_is_registered_and_loads_through_open_clip():
    assert TINY in open_clip.list_models()
    enc = tiny()
    enc.setup()
    assert isinstance(enc._loaded.model, open_clip.CLIP)
    assert not enc._loaded.model.training
    info = enc.info()
    assert info["model"] == TINY and info["pretrained"] == "random" and info["seed"] == 0
    assert info["embed_dim"] == 32 and info["image_size"] == 32 and info["context_length"] == 77
    assert info["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert info["open_clip_version"] == open_clip.__version__
    assert enc.batch_size == 3


def test_cache_shares_one_model_per_key():
    loading.clear_model_cache()
    a, b = tiny(batch_size=2), tiny(batch_size=5)
    a.setup()
    b.setup()
    a.setup()  # a second setup is a no-op
    assert a._loaded is b._loaded and a._loaded.model is b._loaded.model
    other = tiny(seed=1)
    other.setup()
    assert other._loaded.model is not a._loaded.model


def test_cached_model_is_not_shipped_in_a_pickle():
    enc = tiny()
    expected = enc.encode_texts(CAPTIONS)
    blob = pickle.dumps(enc)
    assert len(blob) < 10_000  # configuration only, no weights
    clone = pickle.loads(blob)
    assert clone._loaded is None
    np.testing.assert_array_equal(clone.encode_texts(CAPTIONS), expected)


# -- embeddings ---------------------------------------------------------------------------------


def test_embeddings_are_float32_unit_rows_in_input_order():
    enc = tiny(batch_size=3, prefetch_threads=2)
    imgs = images(7)
    emb = enc.encode_images(imgs)
    assert emb.shape == (7, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([enc.encode_images([im]) for im in imgs])
    np.testing.assert_allclose(emb, one_by_one, atol=1e-6)
    assert not np.allclose(emb[0], emb[1])  # different inputs, different rows

    txt = enc.encode_texts(CAPTIONS)
    assert txt.shape == (len(CAPTIONS), 32) and txt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(txt[1], enc.encode_texts([CAPTIONS[1]])[0], atol=1e-6)


def test_images_can_stream_from_a_generator_and_empty_input_is_empty():
    enc = tiny(batch_size=2)
    imgs = images(5)
    np.testing.assert_array_equal(enc.encode_images(im for im in imgs), enc.encode_images(imgs))
    assert enc.encode_images([]).shape == (0, 32)
    assert enc.encode_texts([]).shape == (0, 32)
    with pytest.raises(TypeError):
        enc.encode_texts("not a list")


def test_call_dispatches_on_the_item_type():
    enc = tiny()
    imgs = images(4)
    np.testing.assert_array_equal(enc(imgs), enc.encode_images(imgs))
    np.testing.assert_array_equal(enc(CAPTIONS), enc.encode_texts(CAPTIONS))
    with pytest.raises(TypeError):
        enc([imgs[0], "text"])


def test_image_tensors_path_matches_encode_images():
    enc = tiny(batch_size=4)
    enc.setup()
    imgs = images(6)
    tensor = torch.stack([enc._loaded.preprocess(im) for im in imgs])
    np.testing.assert_array_equal(enc.encode_image_tensors(tensor), enc.encode_images(imgs))


def test_odd_images_encode_after_the_model_transform():
    enc = tiny()
    rgb = images(1)[0].resize((40, 30))
    odd = [
        Image.new("RGB", (1, 1), (200, 10, 10)),
        rgb.convert("L"),
        rgb.convert("RGBA"),
        rgb.convert("P"),
        rgb.convert("LA"),
        rgb.convert("CMYK"),
        Image.new("1", (5, 9)),
    ]
    emb = enc.encode_images(odd)
    assert emb.shape == (len(odd), 32) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[2], enc.encode_images([rgb])[0], atol=1e-6)  # RGBA: alpha dropped


# -- determinism ---------------------------------------------------------------------------------


def test_two_encoders_with_the_same_seed_give_identical_embeddings():
    loading.clear_model_cache()
    a = tiny()
    first_img, first_txt = a.encode_images(images(5)), a.encode_texts(CAPTIONS)
    loading.clear_model_cache()
    b = tiny()
    b.setup()
    assert b._loaded.model is not a._loaded.model  # really loaded twice
    np.testing.assert_array_equal(b.encode_images(images(5)), first_img)
    np.testing.assert_array_equal(b.encode_texts(CAPTIONS), first_txt)
    # ... and the seed matters, so the test above can fail
    assert not np.allclose(tiny(seed=1).encode_texts(CAPTIONS), first_txt)


def test_embeddings_are_identical_across_processes(tmp_path):
    out = tmp_path / "emb.npy"
    code = (
        "import sys, numpy as np\n"
        "sys.path.insert(0, '.')\n"
        "from tests.test_encoders_clip import tiny, images, CAPTIONS\n"
        "e = tiny()\n"
        "np.save(sys.argv[1], np.concatenate([e.encode_images(images(5)), e.encode_texts(CAPTIONS)]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, cwd=root, timeout=300)
    enc = tiny()
    here = np.concatenate([enc.encode_images(images(5)), enc.encode_texts(CAPTIONS)])
    np.testing.assert_array_equal(np.load(out), here)


# -- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_path_round_trip_gives_identical_embeddings(tmp_path):
    src = tiny(seed=3)
    src.setup()
    path = tmp_path / "tiny.pt"
    torch.save(src._loaded.model.state_dict(), path)
    enc = tiny(pretrained=str(path))
    np.testing.assert_array_equal(enc.encode_images(images(4)), src.encode_images(images(4)))
    np.testing.assert_array_equal(enc.encode_texts(CAPTIONS), src.encode_texts(CAPTIONS))
    info = enc.info()
    assert info["pretrained"] == str(path) and info["weights"] == "path" and info["seed"] is None
    assert info["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_tag_already_in_the_hf_cache_loads_offline(tmp_path, monkeypatch):
    """Tags resolve to the cached file without any network (HF cache layout of huggingface_hub)."""
    from huggingface_hub import constants
    from open_clip import pretrained as oc_pretrained

    src = tiny(seed=4)
    src.setup()
    monkeypatch.setitem(oc_pretrained._PRETRAINED, TINY, {"cachedtag": oc_pretrained._pcfg(hf_hub="mmdata/tiny-test/")})
    snapshot = tmp_path / "hub" / "models--mmdata--tiny-test" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--mmdata--tiny-test" / "refs").mkdir()
    (tmp_path / "hub" / "models--mmdata--tiny-test" / "refs" / "main").write_text("a" * 40)
    torch.save(src._loaded.model.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    enc = tiny(pretrained="cachedtag")
    np.testing.assert_array_equal(enc.encode_texts(CAPTIONS), src.encode_texts(CAPTIONS))
    info = enc.info()
    assert info["pretrained"] == "cachedtag" and info["weights"] == "tag"
    assert info["checkpoint"].endswith("open_clip_pytorch_model.bin") and len(info["checkpoint_sha256"]) == 64


def test_missing_checkpoint_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as excinfo:
        tiny(pretrained=str(tmp_path / "nope.pt")).setup()
    assert_one_line_error(excinfo, "not found", "--pretrained")


@pytest.mark.parametrize("content", ["garbage", "wrong_model", "empty"])
def test_corrupt_or_mismatched_checkpoint_is_a_user_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 100)
    elif content == "wrong_model":
        enc = tiny()
        enc.setup()
        state = enc._loaded.model.state_dict()
        torch.save({k: v for k, v in state.items() if not k.startswith("visual.")}, path)
    else:
        torch.save({}, path)
    with pytest.raises(UserError) as excinfo:
        tiny(pretrained=str(path), device="cpu").setup()
    assert_one_line_error(excinfo, "cannot load mmdata-tiny", "--pretrained")


def test_unknown_model_and_unknown_tag_are_user_errors():
    with pytest.raises(UserError) as excinfo:
        ClipEncoder("ViT-B-33", pretrained=None).setup()
    assert_one_line_error(excinfo, "unknown model 'ViT-B-33'", "ViT-B-32")
    with pytest.raises(UserError) as excinfo:
        ClipEncoder("ViT-B-32", pretrained="laion9b_nonsense").setup()
    assert_one_line_error(excinfo, "'laion9b_nonsense' is neither", "laion2b_e16", "checkpoint")


def test_hub_tag_while_offline_fails_fast_with_the_remedy():
    start = time.perf_counter()
    with pytest.raises(UserError) as excinfo:
        ClipEncoder("ViT-B-32", pretrained="laion2b_s34b_b79k").setup()
    assert time.perf_counter() - start < 2.0
    assert_one_line_error(excinfo, "ViT-B-32/laion2b_s34b_b79k", "HF_HUB_OFFLINE", "--pretrained", "HF_HOME")


def test_hub_tag_without_network_fails_fast_even_when_not_marked_offline(monkeypatch):
    """No HF_HUB_OFFLINE, but the hub is unreachable: a quick probe, not a minute of retries."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    start = time.perf_counter()
    with pytest.raises(UserError) as excinfo:
        ClipEncoder("ViT-B-32", pretrained="laion2b_s34b_b79k").setup()
    assert time.perf_counter() - start < 5.0
    assert_one_line_error(excinfo, "unreachable", "--pretrained")


# -- device, precision, OOM --------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_a_gpu_is_a_user_error():
    with pytest.raises(UserError) as excinfo:
        tiny(device="cuda").setup()
    assert_one_line_error(excinfo, "no CUDA GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU precision policy")
def test_cpu_precision_policy():
    ref = tiny().encode_texts(CAPTIONS)
    bf16 = tiny(precision="bf16")
    assert bf16.info()["precision"] == "bf16"
    emb = bf16.encode_texts(CAPTIONS)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert (emb * ref).sum(axis=1).min() > 0.98  # close to fp32, but bf16
    fp16 = tiny(precision="fp16")
    assert fp16.info()["precision"] == "fp32" and fp16.info()["requested_precision"] == "fp16"
    with pytest.raises(UserError):
        tiny(precision="fp8").setup()


def test_oom_backoff_halves_until_it_fits_and_keeps_order(caplog):
    seen = []

    def forward(x):
        seen.append(len(x))
        if len(x) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. (test)")
        return x * 2

    inputs = torch.arange(10).reshape(10, 1)
    with caplog.at_level("WARNING"):
        out, size = run_with_oom_backoff(forward, inputs, 16)
    assert size == 2
    assert torch.equal(out, inputs * 2)
    assert seen == [10, 8, 4, 2, 2, 2, 2, 2]  # 16 (10 rows), 8 and 4 fail; five chunks of 2
    assert "batch size 2" in caplog.text


def test_oom_at_batch_size_one_is_raised():
    def forward(x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. (test)")

    with pytest.raises(torch.cuda.OutOfMemoryError) as excinfo:
        run_with_oom_backoff(forward, torch.zeros(4, 1), 4)
    assert any("batch size 1" in note for note in excinfo.value.__notes__)


def test_other_errors_are_not_swallowed_by_the_backoff():
    def forward(x):
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        run_with_oom_backoff(forward, torch.zeros(4, 1), 4)


# -- the prefetch pipeline -----------------------------------------------------------------------


def test_pipeline_keeps_order_bounds_lookahead_and_overlaps():
    lock, state = threading.Lock(), {"prepared": 0, "ran": 0, "max_ahead": 0}
    prepared = threading.Condition(lock)
    rng = np.random.default_rng(0)
    delays = rng.uniform(0, 0.002, 20)  # finish out of order

    def prepare(i):
        time.sleep(delays[i])
        with lock:
            state["prepared"] += 1
            state["max_ahead"] = max(state["max_ahead"], state["prepared"] - state["ran"])
            prepared.notify_all()
        return i * 10

    def run(x):
        with lock:  # the "forward": preparation gets ahead of it. The first one waits for a second batch to be
            if state["ran"] == 0:  # prepared (an event, not a sleep that a loaded machine can outlast)
                prepared.wait_for(lambda: state["prepared"] >= 2, timeout=30)
        time.sleep(0.005)
        with lock:
            state["ran"] += 1
        return x + 1

    assert pipelined(range(20), prepare, run, threads=3) == [i * 10 + 1 for i in range(20)]
    assert 1 < state["max_ahead"] <= 4  # prepared ahead of the runner, but bounded
    assert pipelined(range(5), prepare, run, threads=0) == [i * 10 + 1 for i in range(5)]


def test_pipeline_propagates_preparation_errors():
    def prepare(i):
        if i == 3:
            raise OSError("broken image")
        return i

    with pytest.raises(OSError):
        pipelined(range(10), prepare, lambda x: x, threads=2)
