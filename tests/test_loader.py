"""mmdata.loader: batches joined to their stored embeddings, epoch length from sizes.json, exact
splitting over ranks and workers, seeded augmentation, padded audio, batched FAISS neighbours —
and the same shards read by open_clip's own training loader and by Hugging Face datasets."""
import glob
import io
import json
import os
import random
from argparse import Namespace
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps
from test_train_fusion import CLASSES, shapes_build

from mmdata.errors import UserError
from mmdata.loader import EpochPlan, make_loader, read_shards
from mmdata.storage import OutputDir


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_build(tmp_path_factory)


def written(out):
    """key → parquet row (plus its ``shard``) of every written sample."""
    return {r["key"]: {**r, "shard": os.path.basename(f)[:-8]} for f in sorted(glob.glob(f"{out}/shards/*.parquet"))
            for r in pq.read_table(f).to_pylist() if r["status"] == "written"}


def keys_of(loader):
    keys, batches = [], 0
    for batch in loader:
        keys += batch["__key__"]
        batches += 1
    return keys, batches


def test_batches_join_images_tokens_embeddings_and_metadata(shapes):
    out, n = shapes
    rows = written(out)
    loader = make_loader(out, modalities=["image", "text"], batch_size=8, num_workers=2, shuffle_buffer=50)
    assert loader.num_samples == n == sum(json.load(open(f"{out}/shards/sizes.json")).values())
    emb = {m: {os.path.basename(f)[:-4]: np.load(f) for f in glob.glob(f"{out}/embeddings/{m}/*.npy")} for m in ("image", "text")}
    seen, batches = [], 0
    for batch in loader:
        batches += 1
        b = len(batch["__key__"])
        assert batch["image"].shape == (b, 3, 32, 32) and batch["image"].dtype == torch.float32  # tiny CLIP's preprocessing
        assert batch["tokens"].shape == (b, 77) and batch["tokens"].dtype == torch.int64
        assert set(batch["embeddings"]) == {"image", "text"}
        for i, key in enumerate(batch["__key__"]):
            row = rows[key]
            assert batch["id"][i] == row["id"] == batch["json"][i]["id"]
            assert batch["text"][i] == row["caption"]
            assert (batch["shard"][i], int(batch["row"][i])) == (row["shard"], row["row"])
            for m in ("image", "text"):  # the .npy row of (shard, row), not a neighbour's
                assert np.array_equal(batch["embeddings"][m][i].numpy(), emb[m][row["shard"]][row["row"]].astype(np.float32))
            assert CLASSES[batch["json"][i]["meta"]["label"]][0] == key.split("_")[0]  # the corpus's own metadata
        seen += batch["__key__"]
    assert sorted(seen) == sorted(rows)  # every written sample, once
    assert batches == len(loader)


def test_stored_tokens_match_the_models_tokenizer(shapes):
    import open_clip

    out, _ = shapes
    batch = next(iter(make_loader(out, modalities=["text"], batch_size=4, num_workers=0, embeddings=False)))
    assert "embeddings" not in batch and "image" not in batch
    tok = open_clip.get_tokenizer("ViT-B-32")
    assert torch.equal(batch["tokens"], tok(batch["text"]))


def test_shuffle_is_deterministic_per_seed_and_epoch(shapes):
    out, _ = shapes

    def order(epoch, seed=0):
        return keys_of(make_loader(out, modalities=[], batch_size=16, num_workers=2, epoch=epoch, seed=seed))[0]

    first = order(0)
    assert first == order(0)
    assert first != order(1) and sorted(first) == sorted(order(1))
    assert first != order(0, seed=1)
    loader = make_loader(out, modalities=[], batch_size=16, num_workers=2)  # persistent workers follow set_epoch
    loader.set_epoch(1)
    assert keys_of(loader)[0] == order(1)
    loader.set_epoch(0)
    assert keys_of(loader)[0] == first


@pytest.mark.parametrize("epoch", [0, 1])
def test_two_ranks_two_workers_see_every_sample_exactly_once(shapes, epoch):
    out, n = shapes
    shards = read_shards(OutputDir(out))
    assert len(shards) % 4 != 0  # uneven on purpose: 11 shards over 4 readers
    per_rank = []
    for rank in (0, 1):
        loader = make_loader(out, modalities=["image"], batch_size=5, num_workers=2, epoch=epoch,
                             rank=rank, world_size=2, embeddings=False)
        keys, batches = keys_of(loader)
        assert batches == len(loader) and len(keys) == loader.num_samples
        per_rank.append(keys)
    everything = per_rank[0] + per_rank[1]
    assert len(everything) == n and set(everything) == set(written(out))
    assert not set(per_rank[0]) & set(per_rank[1])
    plan = EpochPlan(tuple(shards), epoch, 0, 2, 2)
    readers = [plan.reader_shards(r, w) for r in (0, 1) for w in (0, 1)]
    assert sorted(len(x) for x in readers) == [2, 3, 3, 3]  # 11 = 3 + 3 + 3 + 2: one reader short


def test_rank_and_world_size_come_from_torch_distributed(shapes, monkeypatch):
    import torch.distributed as dist

    out, _ = shapes
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    loader = make_loader(out, modalities=[], batch_size=8, num_workers=0, embeddings=False)
    assert (loader.dataset.spec.rank, loader.dataset.spec.world_size) == (1, 2)
    explicit = make_loader(out, modalities=[], batch_size=8, num_workers=0, embeddings=False, rank=0, world_size=4)
    assert (explicit.dataset.spec.rank, explicit.dataset.spec.world_size) == (0, 4)
    with pytest.raises(UserError, match="rank"):
        make_loader(out, rank=2, world_size=2)


def test_even_mode_gives_every_reader_the_same_full_batches(shapes):
    out, n = shapes
    lengths, real = [], []
    for rank in (0, 1):
        loader = make_loader(out, modalities=[], batch_size=8, num_workers=2, rank=rank, world_size=2,
                             mode="even", embeddings=False)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(len(b["__key__"]) == 8 for b in batches)
        lengths.append(len(batches))
        for b in batches:
            real += [k for k, rep in zip(b["__key__"], b["repeat"].tolist()) if not rep]
    assert lengths[0] == lengths[1]
    assert Counter(real) == Counter(written(out).keys())  # the unflagged samples: each exactly once


def test_resampled_mode_has_a_nominal_length(shapes):
    out, _ = shapes
    loader = make_loader(out, modalities=[], batch_size=8, num_workers=2, mode="resampled", samples_per_epoch=64,
                         embeddings=False)
    keys, batches = keys_of(loader)
    assert batches == len(loader) == 8 and len(keys) == 64  # 2 workers × 4 batches of 8
    assert keys == keys_of(make_loader(out, modalities=[], batch_size=8, num_workers=2, mode="resampled",
                                       samples_per_epoch=64, embeddings=False))[0]


def test_augment_hook_is_seeded_by_seed_key_and_epoch(shapes):
    out, _ = shapes

    def augment(image, key, view, seed):  # what mmdata.augment's Augmenter.image does: draws from (seed, key, view)
        flip = random.Random(f"{seed}:{key}:{view}").random() < 0.5
        return (ImageOps.mirror(image) if flip else image), ["hflip"] if flip else []

    def run(epoch, seed=0, hook=augment):
        loader = make_loader(out, modalities=["image"], batch_size=16, num_workers=2, epoch=epoch, seed=seed,
                             augment=hook, embeddings=False, shuffle_buffer=0, shuffle_shards=False)
        got = {}
        for b in loader:
            for i, (key, img) in enumerate(zip(b["__key__"], b["image"])):
                got[key] = (img, b["augment"][i]["image"] if hook else None)
        return got

    a, b, c, d = run(0), run(0), run(1), run(0, seed=1)
    assert all(torch.equal(a[k][0], b[k][0]) and a[k][1] == b[k][1] for k in a)
    draws = [[x[k][1] for k in sorted(x)] for x in (a, c, d)]
    assert draws[0] != draws[1] and draws[0] != draws[2]  # another epoch or seed, other draws
    plain = run(0, hook=None)
    flipped = {k for k in a if a[k][1]}
    assert 0 < len(flipped) < len(a)
    assert all(torch.equal(a[k][0], plain[k][0]) == (k not in flipped) for k in a)


def test_the_augmenter_plugs_in_for_images_and_captions(shapes):
    import open_clip

    from mmdata.augment import Augmenter

    out, _ = shapes
    config = {"image": [{"op": "horizontal_flip", "p": 0.5}, {"op": "color_jitter", "p": 1.0, "brightness": 0.3}],
              "text": [{"op": "template", "p": 1.0, "templates": ["a picture of {}"]}]}

    def run(epoch, augment):
        loader = make_loader(out, modalities=["image", "text"], batch_size=32, num_workers=2, epoch=epoch,
                             augment=augment, embeddings=False, shuffle_buffer=0, shuffle_shards=False)
        return {k: (img, text, tok, applied) for b in loader
                for k, img, text, tok, applied in zip(b["__key__"], b["image"], b["text"], b["tokens"], b["augment"])}

    a, again, other = run(0, config), run(0, Augmenter(config)), run(1, config)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the build's --tokenizer: augmented captions are re-tokenized
    for key, (img, text, tok, applied) in a.items():
        assert text.startswith("a picture of ") and torch.equal(tok, tokenizer([text])[0])
        assert torch.equal(img, again[key][0]) and applied == again[key][3]
        assert [op["op"] for op in applied["image"]][-1] == "color_jitter"
    assert [a[k][3]["image"] for k in sorted(a)] != [other[k][3]["image"] for k in sorted(a)]
    hook_only = run(0, Augmenter(config).image)  # the image method alone: the same images, captions untouched
    assert all(torch.equal(a[k][0], hook_only[k][0]) and not hook_only[k][1].startswith("a picture") for k in a)


def test_neighbours_exclude_self_and_carry_stored_embeddings(shapes):
    from mmdata.search import Retriever

    out, _ = shapes
    retriever = Retriever(out)
    loader = make_loader(out, modalities=[], batch_size=16, num_workers=2, neighbours=3,
                         neighbour_embeddings=["image", "text"])
    checked = 0
    for batch in loader:
        nb = batch["neighbours"]
        assert nb["id"].shape == nb["score"].shape == nb["mask"].shape == (len(batch["id"]), 3)
        assert nb["embeddings"]["text"].shape == (len(batch["id"]), 3, 32)
        assert bool(nb["mask"].all())
        for i, key in enumerate(batch["__key__"]):
            assert batch["id"][i] not in nb["id"][i]
            hits = retriever.search_key(key, k=3)  # the one-query path of `mmdata search --key`
            assert [h.id for h in hits] == nb["id"][i].tolist()
            assert nb["key"][i] == [h.key for h in hits]
            assert np.allclose([h.score for h in hits], nb["score"][i].numpy(), atol=1e-5)
            for j, h in enumerate(hits):
                assert np.allclose(retriever.embedding_of(h.key, "text"), nb["embeddings"]["text"][i, j].numpy())
                q = batch["embeddings"]["image"][i].numpy()
                assert float(q @ nb["embeddings"]["image"][i, j].numpy()) == pytest.approx(h.score, abs=2e-3)
            checked += 1
    assert checked == len(written(out))


def test_configuration_errors_name_the_problem(shapes, audio_out):
    out, _ = shapes
    with pytest.raises(UserError, match="unknown modalities"):
        make_loader(out, modalities=["video"])
    with pytest.raises(UserError, match="no stored embeddings"):
        make_loader(out, embeddings=["audio"])
    with pytest.raises(UserError, match="mode"):
        make_loader(out, mode="sometimes")
    with pytest.raises(UserError, match="no index"):
        make_loader(audio_out, modalities=[], neighbours=2)
    with pytest.raises(UserError, match="sizes.json"):
        make_loader(os.path.dirname(out) + "/nowhere")


# --------------------------------------------------------------------------------------- audio


@pytest.fixture(scope="module")
def audio_out(tmp_path_factory):
    """Two shards of clips of 0.25 s to 2 s (flac, 16 kHz) with log-mel members, written as a build does."""
    from mmdata.keys import key_to_id
    from mmdata.schema import SHARD_SCHEMA
    from mmdata.transforms.audio import encode_flac
    from mmdata.writers.table import table_bytes
    from mmdata.writers.tar import write_tar

    out = tmp_path_factory.mktemp("audio_out")
    (out / "shards").mkdir()
    sr, sizes = 16000, {}
    for s, durations in enumerate([(0.25, 2.0, 1.0), (1.5, 0.5)]):
        samples, rows = [], []
        for i, dur in enumerate(durations):
            key = f"clip_{s}_{i}"
            t = np.arange(int(dur * sr)) / sr
            wav = 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t).astype(np.float32)
            mel = np.full((8, int(dur * 100)), -20.0 + i, dtype=np.float16)
            buf = io.BytesIO()
            np.save(buf, mel)
            samples.append((key, {"flac": encode_flac(wav, sr), "mel.npy": buf.getvalue(), "txt": f"tone {i}".encode(),
                                  "json": json.dumps({"key": key, "id": key_to_id(key)}).encode()}))
            rows.append({"key": key, "id": key_to_id(key), "status": "written", "row": i, "warnings": [],
                         "source_bytes": len(samples[-1][1]["flac"])})
        with open(out / "shards" / f"{s:05d}.tar", "wb") as fh:
            write_tar(fh, samples)
        (out / "shards" / f"{s:05d}.parquet").write_bytes(table_bytes(rows, SHARD_SCHEMA))
        sizes[f"{s:05d}.tar"] = len(samples)
    (out / "shards" / "sizes.json").write_text(json.dumps(sizes))
    return str(out)


def test_audio_is_cropped_or_padded_with_a_mask(audio_out):
    loader = make_loader(audio_out, modalities=["audio", "mel", "text"], batch_size=5, num_workers=0,
                         audio_seconds=1.0, mel_frames=120, shuffle_buffer=0, shuffle_shards=False, tokenizer=None)
    batch = next(iter(loader))
    assert len(loader) == 1 and batch["sample_rate"] == 16000
    assert batch["audio"].shape == batch["audio_mask"].shape == (5, 16000)
    durations = {"clip_0_0": 0.25, "clip_0_1": 2.0, "clip_0_2": 1.0, "clip_1_0": 1.5, "clip_1_1": 0.5}
    for i, key in enumerate(batch["__key__"]):
        real = min(int(durations[key] * 16000), 16000)
        assert int(batch["audio_mask"][i].sum()) == real
        assert not batch["audio"][i, real:].any()  # zero padding past the clip
        assert int(batch["mel_mask"][i].sum()) == min(int(durations[key] * 100), 120)
    assert batch["mel"].shape == (5, 8, 120) and "tokens" not in batch
    resampled = next(iter(make_loader(audio_out, modalities=["audio"], batch_size=5, num_workers=0, sample_rate=8000,
                                      audio_seconds=1.0, shuffle_buffer=0)))
    assert resampled["audio"].shape == (5, 8000) and resampled["sample_rate"] == 8000


def test_audio_and_mel_augmentation_happen_before_the_crop(audio_out):
    config = {"audio": [{"op": "gain", "p": 1.0, "min_db": -12, "max_db": -6}],
              "mel": [{"op": "freq_mask", "p": 1.0, "max_width": 4, "count": 1}]}
    kw = dict(modalities=["audio", "mel"], batch_size=5, num_workers=0, audio_seconds=1.0, mel_frames=120,
              shuffle_buffer=0, shuffle_shards=False)
    plain = next(iter(make_loader(audio_out, **kw)))
    aug = next(iter(make_loader(audio_out, augment=config, **kw)))
    assert torch.equal(plain["audio_mask"], aug["audio_mask"]) and torch.equal(plain["mel_mask"], aug["mel_mask"])
    quieter = aug["audio"].abs().amax(1) / plain["audio"].abs().amax(1)
    assert bool(((quieter > 0.2) & (quieter < 0.55)).all())  # -12 … -6 dB
    assert all(applied["mel"][0]["op"] == "freq_mask" for applied in aug["augment"])


def test_random_audio_crops_follow_seed_key_and_epoch(audio_out):
    def crop(epoch):
        loader = make_loader(audio_out, modalities=["audio"], batch_size=5, num_workers=0, audio_seconds=0.2,
                             crop="random", epoch=epoch, shuffle_buffer=0, shuffle_shards=False)
        b = next(iter(loader))
        return dict(zip(b["__key__"], b["audio"]))

    a, b, c = crop(0), crop(0), crop(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["clip_0_1"], c["clip_0_1"])  # a 2 s clip, another 0.2 s window


def test_a_damaged_member_names_the_sample_and_shard(tmp_path):
    from mmdata.keys import key_to_id
    from mmdata.loader import LoaderDecodeError
    from mmdata.schema import SHARD_SCHEMA
    from mmdata.writers.table import table_bytes
    from mmdata.writers.tar import write_tar

    (tmp_path / "shards").mkdir()
    with open(tmp_path / "shards" / "00000.tar", "wb") as fh:
        write_tar(fh, [("bad", {"jpg": b"not a jpeg", "txt": b"a caption"})])
    row = {"key": "bad", "id": key_to_id("bad"), "status": "written", "row": 0, "warnings": [], "source_bytes": 10}
    (tmp_path / "shards" / "00000.parquet").write_bytes(table_bytes([row], SHARD_SCHEMA))
    (tmp_path / "shards" / "sizes.json").write_text('{"00000.tar": 1}')
    with pytest.raises(LoaderDecodeError, match=r"bad\.jpg in shards/00000\.tar"):
        next(iter(make_loader(str(tmp_path), modalities=["image"], num_workers=0, transform=lambda im: im)))


# ----------------------------------------------------------------------------------- ecosystem


def test_open_clip_training_loader_reads_our_shards(shapes, monkeypatch):
    import functools

    import open_clip
    import open_clip_train.data
    from open_clip_train.data import get_wds_dataset
    from webdataset.tariterators import tar_file_expander

    # open_clip_train 3.3's training path breaks on webdataset >= 0.2.96 whatever the shards: the
    # end-of-shard marker ({}) reaches its group_by_keys_nothrow → KeyError 'fname' (webdataset#384,
    # open_clip#935). Its documented fix, applied here as users must until open_clip ships it:
    monkeypatch.setattr(open_clip_train.data, "tar_file_expander", functools.partial(tar_file_expander, eof_value=None))
    out, n = shapes
    tars = sorted(glob.glob(f"{out}/shards/*.tar"))
    urls = f"{out}/shards/{{{os.path.basename(tars[0])[:-4]}..{os.path.basename(tars[-1])[:-4]}}}.tar"
    args = Namespace(train_data=urls, val_data=None, dataset_resampled=False, train_num_samples=None,
                     train_data_upsampling_factors=None, seed=0, batch_size=1, workers=1, world_size=1)
    preprocess = open_clip.image_transform(64, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    assert data.dataloader.num_samples == n  # counted from our sizes.json
    images, texts = 0, set()
    for image, text in data.dataloader:
        assert image.shape == (1, 3, 64, 64)
        images += 1
        texts.add(tuple(text[0].tolist()))
    assert images == n
    captions = {r["caption"] for r in written(out).values()}
    assert texts == {tuple(t.tolist()) for t in tokenizer(sorted(captions))}
    val = Namespace(**{**vars(args), "train_data": None, "val_data": urls, "val_num_samples": n, "batch_size": 16})
    data = get_wds_dataset(val, preprocess, is_train=False, tokenizer=tokenizer)  # webdataset's own tar reader
    assert sum(len(images) for images, _ in data.dataloader) == n


def test_hugging_face_datasets_webdataset_builder(shapes, tmp_path):
    from datasets import load_dataset

    out, n = shapes
    tars = sorted(glob.glob(f"{out}/shards/*.tar"))
    ds = load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == n
    rows = written(out)
    assert sorted(ds["__key__"]) == sorted(rows)
    first = ds[0]
    assert isinstance(first["jpg"], Image.Image) and first["jpg"].size == (64, 64)
    assert first["txt"] == rows[first["__key__"]]["caption"]
    assert first["json"]["id"] == rows[first["__key__"]]["id"]
