"""Seeded augmentation of images, audio, log-mels and captions, offline (extra views in the
shards) or online (in the loader), with randomness only from ``hash(seed, key, view)``.

    aug = Augmenter("pipelines/configs/augment_example.yaml")
    view_image, applied = aug.image(image, key, view=1)        # offline view 1 → <key>_v01
    make_loader(out, augment=aug.image, seed=0)                 # online: per (seed, key, epoch)
"""
from mmdata.augment.augmenter import Augmenter, view_key
from mmdata.augment.config import AugmentConfig, load_augment_config
from mmdata.augment.seeding import sample_seed

__all__ = ["Augmenter", "AugmentConfig", "load_augment_config", "sample_seed", "view_key"]
