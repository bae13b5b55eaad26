"""mmdata.augment: seeded, recorded, deterministic augmentation of images, audio, log-mels and captions."""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import random

import numpy as np
import pytest
from PIL import Image

from mmdata.augment import AugmentConfig, Augmenter, load_augment_config, view_key
from mmdata.errors import UserError

SR = 16000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "pipelines", "configs", "augment_example.yaml")

# every op, firing always: what the determinism and replay tests exercise
ALL_OPS = {
    "image": [
        {"op": "random_resized_crop", "scale": [0.3, 1.0], "size": [48, 40]},
        {"op": "horizontal_flip"},
        {"op": "color_jitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
        {"op": "rotation", "degrees": 20},
        {"op": "grayscale", "p": 0.5},
        {"op": "gaussian_blur", "sigma": [0.5, 1.5]},
        {"op": "jpeg", "quality": [30, 80]},
    ],
    "audio": [
        {"op": "gain", "min_db": -6, "max_db": 6},
        {"op": "noise", "min_snr_db": 10, "max_snr_db": 30},
        {"op": "time_shift", "max_fraction": 0.3},
        {"op": "speed", "min_factor": 0.8, "max_factor": 1.2},
        {"op": "pitch_shift", "min_semitones": -3, "max_semitones": 3},
        {"op": "low_pass", "min_cutoff_hz": 2000, "max_cutoff_hz": 6000},
        {"op": "high_pass", "min_cutoff_hz": 50, "max_cutoff_hz": 300},
    ],
    "mel": [{"op": "freq_mask", "max_width": 10, "count": 2}, {"op": "time_mask", "max_width": 20, "count": 2}],
    "text": [{"op": "choose_caption"}, {"op": "template", "templates": ["a photo of {}", "a drawing of {}", "{}"]}],
}


def photo(size=(64, 48)) -> Image.Image:
    import skimage

    path = os.path.join(os.path.dirname(skimage.__file__), "data", "astronaut.png")
    return Image.open(path).convert("RGB").resize(size, Image.Resampling.BILINEAR)


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def clip(seconds=0.5, freq=440.0, channels=0) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    x = (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * np.sin(2 * np.pi * 3 * freq * t)).astype(np.float32)
    return np.stack([x, 0.5 * x], axis=1) if channels else x


def mel(n_mels=40, frames=60) -> np.ndarray:
    return np.random.default_rng(1).normal(-40, 10, (n_mels, frames)).astype(np.float16)


def views(aug: Augmenter, keys, seed=7, image=None, audio=None) -> list[bytes]:
    """Everything one (key, view) produces, as bytes."""
    image = photo() if image is None else image
    audio = clip() if audio is None else audio
    out = []
    for key in keys:
        for view in (1, 2):
            im, a = aug.image(image, key, view, seed)
            wav, b = aug.audio(audio, SR, key, view, seed)
            m, c = aug.mel(mel(), key, view, seed)
            txt, d = aug.text(["a cat", "a small cat", "cat"], key, view, seed)
            out.append(png(im) + wav.tobytes() + m.tobytes() + txt.encode() + json.dumps([a, b, c, d]).encode())
    return out


def _views_in_child(args):
    config, image_png, audio, keys = args
    return views(Augmenter(config), keys, image=Image.open(io.BytesIO(image_png)), audio=audio)


def one(op: dict, modality="image") -> Augmenter:
    return Augmenter({modality: [op]})


def dominant_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / SR)[np.argmax(spectrum)])


def band_db(x: np.ndarray, lo: float, hi: float) -> float:
    f = np.fft.rfftfreq(len(x), 1 / SR)
    power = np.abs(np.fft.rfft(x)) ** 2
    return 10 * np.log10(power[(f >= lo) & (f < hi)].mean() + 1e-30)


# ------------------------------------------------------------------------------- determinism


def test_same_seed_gives_the_same_bytes_across_calls_and_instances():
    keys = ["a", "b_c", "img-003"]
    first = views(Augmenter(ALL_OPS), keys)
    assert first == views(Augmenter(ALL_OPS), keys) == views(Augmenter(ALL_OPS), keys)
    assert len(set(first)) == len(first)  # every (key, view) draws its own
    assert views(Augmenter(ALL_OPS), keys, seed=8) != first
    other = views(Augmenter(ALL_OPS), keys, seed=8)
    assert all(x != y for x, y in zip(first, other))


def test_a_spawn_pool_of_two_gives_the_bytes_of_this_process():
    keys = [f"k{i}" for i in range(4)]
    image, audio = photo(), clip()
    here = views(Augmenter(ALL_OPS), keys, image=image, audio=audio)
    jobs = [(ALL_OPS, png(image), audio, keys[:2]), (ALL_OPS, png(image), audio, keys[2:])]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        there = [b for part in pool.map(_views_in_child, jobs) for b in part]
    assert there == here


def test_global_random_state_is_neither_read_nor_advanced():
    import torch  # here, not at the top: the spawn test's children import this module

    aug = Augmenter(ALL_OPS)
    outputs = []
    for scramble in (1, 2, 3):
        random.seed(scramble)
        np.random.seed(scramble)
        torch.manual_seed(scramble)
        random.random(), np.random.random(10), torch.rand(3)  # noqa: B018 - move every stream along
        states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()
        outputs.append(views(aug, ["x", "y"]))
        assert random.getstate() == states[0]
        assert np.array_equal(np.random.get_state()[1], states[1])
        assert torch.equal(torch.get_rng_state(), states[2])
    assert outputs[0] == outputs[1] == outputs[2]


def test_an_ops_draws_do_not_depend_on_the_other_ops():
    crop = {"op": "random_resized_crop", "scale": [0.2, 1.0]}
    alone = Augmenter({"image": [crop, {"op": "horizontal_flip", "p": 0.0}]})
    with_flip = Augmenter({"image": [crop, {"op": "horizontal_flip", "p": 1.0}]})
    im = photo()
    for key in ("a", "b", "c"):
        assert alone.image(im, key, 1)[1][0] == with_flip.image(im, key, 1)[1][0]


def test_the_default_seed_comes_from_the_config_and_the_loader_hook_fits():
    aug = Augmenter({"seed": 5, **ALL_OPS})
    im = photo()
    assert png(aug.image(im, "k", 1)[0]) == png(aug.image(im, "k", 1, 5)[0]) != png(aug.image(im, "k", 1, 6)[0])
    res = aug.image(im, "k", 0, 123456789012345678)  # make_loader's call: (image, key, 0, mix_seed(seed, epoch))
    assert isinstance(res, tuple) and isinstance(res[0], Image.Image) and isinstance(res[1], list)


# -------------------------------------------------------------------------------- image ops


def test_flip_mirrors_and_keeps_the_size():
    im = photo()
    out, applied = one({"op": "horizontal_flip"}).image(im, "k")
    assert applied == [{"op": "horizontal_flip"}] and out.size == im.size
    assert np.array_equal(np.asarray(out), np.asarray(im)[:, ::-1])


def test_crop_has_the_configured_size_and_records_its_box():
    im = photo((80, 60))
    aug = one({"op": "random_resized_crop", "scale": [0.25, 0.5], "ratio": [0.75, 1.333], "size": [32, 24]})
    for key in map(str, range(20)):
        out, [rec] = aug.image(im, key)
        assert out.size == (32, 24) and rec["size"] == [32, 24]
        left, top, right, bottom = rec["box"]
        assert 0 <= left < right <= 80 and 0 <= top < bottom <= 60
        assert 0.2 <= (right - left) * (bottom - top) / (80 * 60) <= 0.55  # scale, give or take rounding
        assert png(out) == png(im.resize((32, 24), Image.Resampling.BICUBIC, box=tuple(rec["box"])))
    assert one({"op": "random_resized_crop"}).image(im, "k")[0].size == (80, 60)  # size: null keeps it
    assert one({"op": "random_resized_crop", "size": 16}).image(im, "k")[0].size == (16, 16)


def test_rotation_colour_grayscale_blur_and_jpeg_change_what_they_should():
    im = photo()
    out, [rec] = one({"op": "rotation", "degrees": [5, 10]}).image(im, "k")
    assert out.size == im.size and 5 <= rec["angle"] <= 10 and out.getpixel((0, 0)) == (0, 0, 0)  # filled corner

    gray = Image.new("RGB", (8, 8), (100, 100, 100))
    out, [rec] = one({"op": "color_jitter", "brightness": 0.5}).image(gray, "k")
    assert set(rec) == {"op", "brightness"} and 0.5 <= rec["brightness"] <= 1.5
    assert abs(np.asarray(out).astype(int) - round(100 * rec["brightness"])).max() <= 1

    out, _ = one({"op": "grayscale"}).image(im, "k")
    a = np.asarray(out)
    assert out.mode == "RGB" and np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])

    out, [rec] = one({"op": "gaussian_blur", "sigma": [1.5, 2.0]}).image(im, "k")
    assert out.size == im.size and 1.5 <= rec["sigma"] <= 2.0
    assert np.abs(np.diff(np.asarray(out, float), axis=1)).mean() < 0.7 * np.abs(np.diff(np.asarray(im, float), axis=1)).mean()

    out, [rec] = one({"op": "jpeg", "quality": [20, 30]}).image(im, "k")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=rec["quality"])
    assert out.size == im.size and 20 <= rec["quality"] <= 30
    assert np.array_equal(np.asarray(out), np.asarray(Image.open(buf).convert("RGB")))
    assert not np.array_equal(np.asarray(out), np.asarray(im))


def test_probabilities_hold_over_many_keys():
    im = Image.new("RGB", (2, 2))
    for p in (0.0, 0.3, 1.0):
        aug = one({"op": "horizontal_flip", "p": p})
        fired = sum(bool(aug.image(im, f"key{i}", 1)[1]) for i in range(2000)) / 2000
        assert abs(fired - p) <= 0.05 and (p not in (0.0, 1.0) or fired == p)
    aug = one({"op": "gain", "p": 0.3}, "audio")
    fired = sum(bool(aug.audio(np.zeros(4, np.float32), SR, f"key{i}", 1)[1]) for i in range(2000)) / 2000
    assert abs(fired - 0.3) <= 0.05


# -------------------------------------------------------------------------------- audio ops


def test_gain_changes_rms_by_the_drawn_db():
    x = clip()
    out, [rec] = one({"op": "gain", "min_db": -12, "max_db": 12}, "audio").audio(x, SR, "k")
    rms = lambda v: np.sqrt(np.mean(np.square(v, dtype=np.float64)))  # noqa: E731
    assert -12 <= rec["gain_db"] <= 12 and out.shape == x.shape
    assert 20 * np.log10(rms(out) / rms(x)) == pytest.approx(rec["gain_db"], abs=1e-4)


def test_noise_is_at_the_drawn_snr_and_silence_stays_finite():
    x = clip(seconds=1.0)
    out, [rec] = one({"op": "noise", "min_snr_db": 5, "max_snr_db": 20}, "audio").audio(x, SR, "k")
    noise = out.astype(np.float64) - x
    snr = 20 * np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2)) / np.sqrt(np.mean(noise ** 2)))
    assert 5 <= rec["snr_db"] <= 20 and snr == pytest.approx(rec["snr_db"], abs=0.2)
    silent, _ = one({"op": "noise"}, "audio").audio(np.zeros(SR, np.float32), SR, "k")
    assert np.isfinite(silent).all() and not silent.any()


def test_time_shift_keeps_the_duration():
    x = clip()
    out, [rec] = one({"op": "time_shift", "max_fraction": 0.5}, "audio").audio(x, SR, "k")
    assert out.shape == x.shape and abs(rec["shift"]) <= len(x) // 2 and np.array_equal(out, np.roll(x, rec["shift"]))
    for key in ("a", "b", "c", "d"):
        out, [rec] = one({"op": "time_shift", "max_fraction": 0.5, "rollover": False}, "audio").audio(x, SR, key)
        s = rec["shift"]
        assert out.shape == x.shape and (not out[:s].any() if s > 0 else not out[len(x) + s:].any())


def test_speed_changes_the_duration_and_pitch_by_the_drawn_factor():
    x = clip(seconds=1.0)
    out, [rec] = one({"op": "speed", "min_factor": 0.7, "max_factor": 0.8}, "audio").audio(x, SR, "k")
    assert abs(len(out) - len(x) / rec["factor"]) <= 1
    assert dominant_hz(out) == pytest.approx(440 * rec["factor"], rel=0.01)


def test_pitch_shift_keeps_the_duration_and_moves_the_pitch():
    x = clip(seconds=1.0)
    out, [rec] = one({"op": "pitch_shift", "min_semitones": 2, "max_semitones": 4}, "audio").audio(x, SR, "k")
    assert out.shape == x.shape
    assert dominant_hz(out) == pytest.approx(440 * 2 ** (rec["semitones"] / 12), rel=0.02)


def test_low_and_high_pass_remove_energy_beyond_the_cutoff():
    x = np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 0.1
    out, [rec] = one({"op": "low_pass", "min_cutoff_hz": 2000, "max_cutoff_hz": 3000}, "audio").audio(x, SR, "k")
    c = rec["cutoff_hz"]
    assert out.shape == x.shape
    assert band_db(x, 1.5 * c, 8000) - band_db(out, 1.5 * c, 8000) > 40
    assert abs(band_db(x, 100, 0.6 * c) - band_db(out, 100, 0.6 * c)) < 1
    out, [rec] = one({"op": "high_pass", "min_cutoff_hz": 400, "max_cutoff_hz": 600}, "audio").audio(x, SR, "k")
    c = rec["cutoff_hz"]
    assert band_db(x, 1, c / 1.5) - band_db(out, 1, c / 1.5) > 25
    assert abs(band_db(x, 2 * c, 7000) - band_db(out, 2 * c, 7000)) < 1
    # a cutoff above this rate's Nyquist leaves the clip as it is, and says so
    out, [rec] = one({"op": "low_pass", "min_cutoff_hz": 9000, "max_cutoff_hz": 9500}, "audio").audio(x, SR, "k")
    assert rec["skipped"] == "cutoff_above_nyquist" and np.array_equal(out, x)


def test_masks_blank_the_recorded_bands_and_frames_only():
    m = mel()
    out, [rec] = one({"op": "freq_mask", "max_width": 8, "count": 2}, "mel").mel(m, "k")
    rows = {r for start, width in rec["masks"] for r in range(start, start + width)}
    fill = np.float16(np.mean(m, dtype=np.float64))
    assert out.dtype == m.dtype and out.shape == m.shape
    for r in range(m.shape[0]):
        assert (out[r] == fill).all() if r in rows else np.array_equal(out[r], m[r])
    out, [rec] = one({"op": "time_mask", "max_width": 30, "max_fraction": 0.1, "value": -80}, "mel").mel(m, "k")
    (start, width), = rec["masks"]
    assert width <= 6
    assert (out[:, start:start + width] == -80).all()
    assert np.array_equal(np.delete(out, range(start, start + width), axis=1), np.delete(m, range(start, start + width), axis=1))


# ------------------------------------------------------------------------------------ text


def test_text_chooses_a_caption_and_wraps_it_in_a_template():
    aug = Augmenter({"text": ALL_OPS["text"]})
    captions = ["a cat", "a small cat", "a cat on a mat"]
    seen = set()
    for key in map(str, range(60)):
        out, (choose, template) = aug.text(captions, key)
        assert out == template["template"].format(captions[choose["index"]])
        seen.add(out)
    assert len(seen) == 9  # every caption in every template
    assert aug.text("dog", "k")[0] in {"a photo of dog", "a drawing of dog", "dog"}
    assert aug.text([], "k") == ("", [])
    assert Augmenter({}).text(["first", "second"], "k") == ("first", [])


# ------------------------------------------------------------------------- records and replay


@pytest.mark.parametrize("config", [ALL_OPS, EXAMPLE], ids=["all_ops", "example_yaml"])
def test_records_are_json_and_replaying_them_reproduces_the_output(config):
    aug = Augmenter(config)
    im, x, m = photo(), clip(), mel()
    for key in ("a", "b", "c", "d"):
        out, applied = aug.image(im, key, 1)
        assert json.loads(json.dumps(applied)) == applied
        assert png(aug.replay("image", im, applied)) == png(out)
        wav, applied = aug.audio(x, SR, key, 1)
        assert json.loads(json.dumps(applied)) == applied
        assert aug.replay("audio", x, applied, sr=SR).tobytes() == wav.tobytes()
        masked, applied = aug.mel(m, key, 1)
        assert aug.replay("mel", m, applied).tobytes() == masked.tobytes()
        text, applied = aug.text(["a", "b"], key, 1)
        assert aug.replay("text", ["a", "b"], applied) == text


def test_a_full_sample_through_the_stage_call():
    out = Augmenter(ALL_OPS)({"image": photo(), "audio": clip(), "sample_rate": SR, "text": "cat", "json": {}}, "k", 1)
    assert set(out["augment"]) == {"image", "audio", "text"} and out["json"] == {}
    assert isinstance(out["image"], Image.Image) and out["text"].endswith("cat")


# ------------------------------------------------------------------------------ edge inputs


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16", "1"])
@pytest.mark.parametrize("size", [(1, 1), (3, 1), (64, 48)])
def test_any_mode_and_a_one_pixel_image_come_out_rgb(mode, size):
    im = photo(size).convert(mode if mode != "I;16" else "I").convert(mode) if mode != "RGBA" else photo(size).convert("RGBA")
    for config in (ALL_OPS, EXAMPLE):
        for key in ("a", "b"):
            out, _ = Augmenter(config).image(im, key, 1)
            assert out.mode == "RGB"
    out, _ = Augmenter({"image": [{"op": "horizontal_flip"}]}).image(Image.new("RGBA", (2, 2), (0, 0, 0, 0)), "k")
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparency lands on white, as in the build


@pytest.mark.parametrize("frames", [0, 1, 10, 300])
@pytest.mark.parametrize("channels", [0, 2])
def test_empty_short_and_stereo_clips_pass_every_op(frames, channels):
    x = clip(seconds=1.0, channels=channels)[:frames]
    aug = Augmenter(ALL_OPS)
    for key in ("a", "b", "c"):
        out, applied = aug.audio(x, SR, key, 1)
        factor = next(r["factor"] for r in applied if r["op"] == "speed")
        assert out.dtype == np.float32 and np.isfinite(out).all()
        assert out.shape[1:] == x.shape[1:] and abs(len(out) - len(x) / factor) <= 1


def test_silent_audio_and_tiny_mels_stay_finite():
    aug = Augmenter(ALL_OPS)
    out, _ = aug.audio(np.zeros(SR, np.float32), SR, "k", 1)
    assert np.isfinite(out).all() and np.abs(out).max() < 1e-6
    for shape in [(40, 0), (40, 3), (2, 60)]:
        out, applied = aug.mel(np.zeros(shape, np.float16), "k", 1)
        assert out.shape == shape and np.isfinite(out).all()


# ---------------------------------------------------------------------------------- config


@pytest.mark.parametrize("config, expected", [
    ({"image": [{"op": "hflip"}]}, ["'hflip'", "horizontal_flip", "random_resized_crop"]),
    ({"image": [{"op": "random_resized_crop", "scal": [0.5, 1]}]}, ["'scal'", "valid: p, scale, ratio, size"]),
    ({"audio": [{"op": "gain", "p": 1.5}]}, ["audio", "gain", "p:", "less than or equal to 1"]),
    ({"audio": [{"op": "gain", "p": -0.1}]}, ["gain", "p:", "greater than or equal to 0"]),
    ({"audio": [{"op": "gain", "p": "often"}]}, ["gain", "p:", "valid number"]),
    ({"image": [{"op": "random_resized_crop", "scale": "big"}]}, ["random_resized_crop", "scale"]),
    ({"audio": [{"op": "gain", "min_db": 6, "max_db": -6}]}, ["min_db", "max_db"]),
    ({"audio": [{"op": "time_mask"}]}, ["'time_mask' is a mel op"]),
    ({"text": [{"op": "template", "templates": ["a photo of"]}]}, ["template", "{}"]),
    ({"image": [{"op": "color_jitter"}]}, ["color_jitter", "brightness"]),
    ({"image": [{"p": 0.5}]}, ["no 'op'", "horizontal_flip"]),
    ({"image": ["horizontal_flip"]}, ["expected a mapping"]),
    ({"video": []}, ["'video'", "image, audio, mel, text"]),
    ({"views": -1}, ["views"]),
])
def test_bad_configs_name_the_problem_in_one_line(config, expected):
    with pytest.raises(UserError) as err:
        Augmenter(config)
    message = str(err.value)
    assert "\n" not in message and all(e in message for e in expected), message


def test_yaml_configs_load_and_round_trip(tmp_path):
    cfg = load_augment_config(EXAMPLE)
    assert cfg.views == 2 and [op.op for op in cfg.image][:3] == ["random_resized_crop", "horizontal_flip", "color_jitter"]
    assert AugmentConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # what a manifest stores reads back
    nested = tmp_path / "build.yaml"
    nested.write_text("augment:\n  image:\n    - {op: horizontal_flip, p: 0.5}\n")
    assert load_augment_config(str(nested)).image[0].p == 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text("image: [{op: horizontal_flip, p: 0.5\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_augment_config(str(bad))
    with pytest.raises(UserError, match="cannot read"):
        load_augment_config(str(tmp_path / "missing.yaml"))


def test_view_keys_are_tar_safe_and_bounded():
    assert view_key("a_cat", 1) == "a_cat_v01" and view_key("a_cat", 12) == "a_cat_v12"
    long = "k" * 128
    keys = {view_key(long, v) for v in (1, 2, 3)}
    assert len(keys) == 3 and all(len(k) <= 128 and "." not in k for k in keys)
