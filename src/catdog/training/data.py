"""The processed split as Lightning data: decoded and normalised by catdog.preprocessing, train augmented."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from catdog.config import CLASSES, SPLITS, AugmentParams
from catdog.errors import CatdogError
from catdog.preprocessing import PreprocessConfig, decode, normalize
from catdog.stages import prepare

log = logging.getLogger(__name__)

FeatureExtractor = Callable[[DataLoader], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


def read_manifest(processed: Path, class_names: Sequence[str] = CLASSES) -> dict[str, list[Sample]]:
    """Samples per split from processed/manifest.csv (paths in it are relative to `processed`)."""
    splits: dict[str, list[Sample]] = {split: [] for split in SPLITS}
    for row in prepare.read_manifest(processed / "manifest.csv"):
        splits[row["split"]].append(Sample(processed / row["path"], class_names.index(row["label"])))
    return splits


def limit_samples(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """At most `limit` samples: a seeded random subset that alternates the classes."""
    if limit is None or len(samples) <= limit:
        return samples
    rng = random.Random(seed)
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample.label, []).append(sample)
    ranked: list[tuple[int, int, Sample]] = []
    for label, group in sorted(by_class.items()):
        rng.shuffle(group)
        ranked += [(rank, label, sample) for rank, sample in enumerate(group)]
    ranked.sort(key=lambda entry: entry[:2])
    return [sample for _, _, sample in ranked[:limit]]


def train_augmentation(augment: AugmentParams, size: int) -> A.Compose:
    """The training-split augmentations, on HWC uint8 RGB arrays of `size`x`size`."""
    transforms: list[A.BasicTransform] = [
        A.RandomResizedCrop(size=(size, size), scale=augment.random_resized_crop_scale, p=1.0),
    ]
    if augment.hflip > 0:
        transforms.append(A.HorizontalFlip(p=augment.hflip))
    if augment.rotate_limit > 0:
        transforms.append(A.Rotate(limit=augment.rotate_limit, border_mode=cv2.BORDER_REFLECT_101, p=0.5))
    if augment.color_jitter > 0:
        jitter = augment.color_jitter
        transforms.append(
            A.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=jitter / 4, p=0.8)
        )
    return A.Compose(transforms)


class ImageDataset(Dataset):
    """(CHW float32 tensor, label) pairs: decode, optional augmentation, then the backbone's normalisation."""

    def __init__(
        self, samples: Sequence[Sample], preprocess: PreprocessConfig, transform: A.Compose | None = None
    ) -> None:
        self.samples = list(samples)
        self.preprocess = preprocess
        self.transform = transform
        self._seeded_in: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def _augment(self, rgb: np.ndarray) -> np.ndarray:
        if self.transform is None:
            return rgb
        if self._seeded_in != os.getpid():
            # Seeded from torch's RNG (seed_everything, per DataLoader worker): reproducible, and distinct
            # for every process and every dataset object.
            self.transform.set_random_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
            self._seeded_in = os.getpid()
        return self.transform(image=rgb)["image"]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        img = decode(sample.path, size=self.preprocess.size, resize=self.preprocess.resize)
        rgb = self._augment(np.asarray(img))
        return torch.from_numpy(normalize(rgb, self.preprocess.mean, self.preprocess.std)), sample.label


class CatDogDataModule(L.LightningDataModule):
    """data/processed as train/val/test loaders; with a feature cache, the frozen-backbone phase
    (the first `cached_epochs` epochs) trains on pooled backbone features computed once instead of images."""

    def __init__(
        self,
        processed: Path,
        preprocess: PreprocessConfig,
        *,
        batch_size: int = 32,
        num_workers: int = 0,
        augment: AugmentParams | None = None,
        limit_images: int | None = None,
        seed: int = 42,
        cached_epochs: int = 0,
        cache_views: int = 1,
    ) -> None:
        super().__init__()
        self.processed = processed
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.limit_images = limit_images
        self.seed = seed
        self.cached_epochs = cached_epochs
        self.cache_views = cache_views
        self.samples: dict[str, list[Sample]] = {}
        self.feature_extractor: FeatureExtractor | None = None
        self._features: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.samples:
            return
        self.samples = {
            split: limit_samples(samples, self.limit_images, self.seed)
            for split, samples in read_manifest(self.processed).items()
        }
        if not self.samples["train"] or not self.samples["val"]:
            raise CatdogError(f"{self.processed / 'manifest.csv'} has no train or no val images")
        log.info("images: %s", ", ".join(f"{split} {len(s)}" for split, s in self.samples.items()))

    def dataset(self, split: str, *, augmented: bool | None = None) -> ImageDataset:
        """The images of `split`; augmented defaults to True for train (when augmentation is configured)."""
        augmented = split == "train" if augmented is None else augmented
        transform = (
            train_augmentation(self.augment, self.preprocess.size)
            if augmented and self.augment is not None
            else None
        )
        return ImageDataset(self.samples[split], self.preprocess, transform)

    def _loader(self, dataset: Dataset, *, shuffle: bool) -> DataLoader:
        # A last batch of one image would break BatchNorm in training; only then is it dropped.
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=shuffle and len(dataset) % self.batch_size == 1,
        )

    def uses_features(self) -> bool:
        """Whether the current epoch trains (and validates) on cached backbone features."""
        if self.cached_epochs == 0 or self.feature_extractor is None:
            return False
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return epoch < self.cached_epochs

    def _feature_dataset(self, split: str) -> TensorDataset:
        if split not in self._features:
            assert self.feature_extractor is not None
            views = self.cache_views if split == "train" else 1
            parts = [
                self.feature_extractor(self._loader(self.dataset(split, augmented=view > 0), shuffle=False))
                for view in range(views)
            ]
            features = torch.cat([features for features, _ in parts])
            labels = torch.cat([labels for _, labels in parts])
            self._features[split] = TensorDataset(features, labels)
        return self._features[split]

    def _feature_loader(self, split: str, *, shuffle: bool) -> DataLoader:
        return DataLoader(self._feature_dataset(split), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        if self.uses_features():
            return self._feature_loader("train", shuffle=True)
        self._features.clear()
        return self._loader(self.dataset("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if self.uses_features():
            return self._feature_loader("val", shuffle=False)
        return self._loader(self.dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
