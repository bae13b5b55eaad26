"""The data is trainable: a corpus with real structure (8 classes of coloured shapes, captions that
name them) built with the tiny random-weight CLIP, then pipelines/train_fusion.py on the CPU. The
contrastive loss must fall below half its starting value and text→image retrieval must find the
right class far above chance; neighbours from the FAISS index work as hard negatives."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_build
from PIL import Image, ImageDraw

from pipelines.train_fusion import evaluate, load_model, main, train

TINY = dict(model="mmdata-tiny", pretrained="random", embed_batch_size=8)
CLASSES = [("red", (220, 40, 40), "circle"), ("green", (40, 180, 60), "square"), ("blue", (40, 70, 220), "triangle"),
           ("yellow", (230, 210, 40), "circle"), ("magenta", (210, 50, 200), "square"), ("cyan", (50, 210, 220), "triangle"),
           ("orange", (240, 140, 30), "square"), ("white", (245, 245, 245), "circle")]
TEMPLATES = ("a {c} {s}", "a photo of a {c} {s}", "a drawing of a {c} {s} on grey", "one {c} {s}")
PER_CLASS = 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = 12  # 128 samples → 11 shards: not a multiple of 2 ranks × 2 workers


def make_shapes_corpus(root: str, per_class: int = PER_CLASS, seed: int = 0) -> int:
    """``per_class`` images of each class (a shape of the class's colour at a random place and size, on
    noise) with a caption naming colour and shape in one of four phrasings, and ``{"label": class}``."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for label, (colour, rgb, shape) in enumerate(CLASSES):
        for i in range(per_class):
            im = Image.fromarray(rng.integers(60, 100, size=(64, 64, 3)).astype(np.uint8))
            r = int(rng.integers(14, 26))
            x, y = (int(v) for v in rng.integers(r, 64 - r, size=2))
            fill = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in rgb)
            draw = ImageDraw.Draw(im)
            if shape == "triangle":
                draw.polygon([(x - r, y + r), (x + r, y + r), (x, y - r)], fill=fill)
            elif shape == "circle":
                draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
            else:
                draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
            stem = os.path.join(root, f"{colour}_{shape}_{i:03d}")
            im.save(stem + ".png")
            with open(stem + ".txt", "w") as fh:
                fh.write(TEMPLATES[i % len(TEMPLATES)].format(c=colour, s=shape))
            with open(stem + ".json", "w") as fh:
                json.dump({"label": label}, fh)
    return len(CLASSES) * per_class


_BUILT: dict = {}


def shapes_build(tmp_path_factory) -> tuple[str, int]:
    """The shapes corpus built once per test session (tokens, tiny-CLIP embeddings, FAISS index)."""
    if "out" not in _BUILT:
        corpus = str(tmp_path_factory.mktemp("shapes"))
        n = make_shapes_corpus(corpus)
        out = str(tmp_path_factory.mktemp("shapes_out"))
        run_build(corpus, out, workers=1, samples_per_shard=SHARD,
                  image_size=64, tokenize=True, **TINY)
        _BUILT.update(out=out, n=n)
    return _BUILT["out"], _BUILT["n"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_build(tmp_path_factory)


def test_loss_falls_and_retrieval_beats_chance(shapes, tmp_path):
    out, n = shapes
    ckpt = tmp_path / "fusion.pt"
    res = train(out, steps=300, batch_size=32, num_workers=2, seed=0, ckpt=str(ckpt), progress=False, log_every=0)
    losses = res["losses"]
    assert len(losses) == 300 and all(np.isfinite(losses))
    initial, final = np.mean(losses[:10]), np.mean(losses[-20:])
    assert initial > 2.5  # ≈ log(32): random projections match nothing
    assert final < 0.5 * initial, (initial, final)
    metrics = evaluate(res["model"], out, query="text", target="image")
    assert metrics["samples"] == n
    assert metrics["label_chance"] == pytest.approx(1 / len(CLASSES))
    assert metrics["label_top1"] > 4 * metrics["label_chance"], metrics
    assert metrics["top1"] > 4 * metrics["chance"], metrics
    again = evaluate(load_model(str(ckpt)), out, query="text", target="image")
    assert again == metrics


def test_untrained_model_is_at_chance(shapes):
    """The control for the test above: the same evaluation without training does not find the class."""
    from pipelines.train_fusion import FusionModel, plan_inputs

    out, _ = shapes
    torch.manual_seed(0)
    config, _ = plan_inputs(out)
    metrics = evaluate(FusionModel(config), out)
    assert metrics["label_top1"] < 2.5 * metrics["label_chance"], metrics


def test_neighbours_as_hard_negatives(shapes):
    out, _ = shapes
    res = train(out, steps=60, batch_size=16, hard_negatives=4, num_workers=2, progress=False, log_every=0)
    losses = res["losses"]
    assert all(np.isfinite(losses))
    # 16 in-batch + 4 hard candidates per row: the starting loss is above log(16)
    assert np.mean(losses[:5]) > np.log(16)
    assert np.mean(losses[-10:]) < np.mean(losses[:5])


def test_features_path_trains_on_pixels_and_tokens(shapes):
    out, _ = shapes
    res = train(out, steps=40, batch_size=16, features=True, num_workers=2, progress=False, log_every=0)
    assert res["config"].inputs["image"][0] == "pixels" and res["config"].inputs["text"][0] == "tokens"
    assert np.mean(res["losses"][-10:]) < np.mean(res["losses"][:5])


def test_cli_example(shapes, tmp_path, capsys):
    out, _ = shapes
    ckpt = tmp_path / "ckpt.pt"
    res = subprocess.run([sys.executable, "-m", "pipelines.train_fusion", out, "--steps", "20", "--out", str(ckpt)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "loss" in res.stdout and "retrieval text→image" in res.stdout
    assert "20/20" in res.stderr  # the tqdm bar
    assert torch.load(ckpt, weights_only=True)["steps"] == 20
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "nothing")])
    assert exit_.value.code == 2
    assert "sizes.json" in capsys.readouterr().err


def test_trimodal_build_trains_with_audio(tmp_path):
    """Image + caption + a sound per sample (each class its own tone): the audio embeddings are one
    of the modalities contrasted, and audio→image retrieval finds the class far above chance."""
    import soundfile as sf

    corpus = tmp_path / "tri"
    make_shapes_corpus(str(corpus), per_class=6, seed=1)
    rng = np.random.default_rng(2)
    sr = 16000
    for stem in sorted(p[:-4] for p in os.listdir(corpus) if p.endswith(".png")):
        label = json.load(open(corpus / f"{stem}.json"))["label"]
        t = np.arange(int(sr * 0.5)) / sr
        wave = 0.3 * np.sin(2 * np.pi * 220 * (1.5 ** label) * t) + 0.02 * rng.standard_normal(len(t))
        sf.write(corpus / f"{stem}.wav", wave.astype(np.float32), sr)
    out = tmp_path / "tri_out"
    manifest = run_build(str(corpus), str(out), workers=1, samples_per_shard=SHARD, image_size=64,
                         require=["image", "text", "audio"], audio_encoder="mel-stats", **TINY)
    assert manifest["counts"]["written"] == 6 * len(CLASSES)
    res = train(str(out), steps=120, batch_size=16, num_workers=0, progress=False, log_every=0)
    assert set(res["config"].inputs) == {"image", "text", "audio"}
    assert res["config"].inputs["audio"][0] == "emb"
    losses = res["losses"]
    assert all(np.isfinite(losses)) and np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    metrics = evaluate(res["model"], str(out), query="audio", target="image")
    assert metrics["label_top1"] > 3 * metrics["label_chance"], metrics
