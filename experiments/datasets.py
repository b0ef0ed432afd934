"""The dataset of an experiment config: random-access sources, transforms and iterators."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from experiments.errors import ConfigError

#: ``dataset.augment`` values: ``''`` (no augmentation, the default) or a named train transform of
#: the small sets. ``'shift_noise'``: the demo notebook's MNIST-1D augmentation.
AUGMENTATIONS = ("", "shift_noise")


def shift_noise(record, rng, *, max_shift: int = 4, noise: float = 0.2):
    """The demo notebook's MNIST-1D augmentation (``dataset.augment='shift_noise'``): the signal
    ``[L, C]`` rolled along its length by a uniform integer shift in ``[-max_shift, max_shift]``,
    plus ``N(0, noise^2)`` noise on every value; float32. ``rng`` is the example's generator
    (:func:`kdjax.data.train_example`), so the view is fixed by ``(seed, epoch, id)``."""
    image = np.roll(record["image"], rng.integers(-max_shift, max_shift + 1), axis=0)
    image = image + noise * rng.standard_normal(image.shape)
    return {**record, "image": image.astype(np.float32)}


def train_transform(augment: str):
    """The small sets' train transform for ``dataset.augment`` (None for ``''``)."""
    if augment == "shift_noise":
        return shift_noise
    if augment:
        raise ConfigError(f"config.dataset.augment={augment!r}; valid: "
                          f"{', '.join(repr(a) for a in AUGMENTATIONS)}.")
    return None


@dataclasses.dataclass
class Data:
    """One dataset's sources and iterators.

    ``sources[split]`` is a random-access source (ids are record indices); ``sample_input`` is
    one eval example ``[1, ...]`` as the model sees it. Train batches come from
    :func:`kdjax.data.make_train_iterator` (shuffled, augmented for ImageNet; batch dicts carry
    ``epoch``), eval batches from :func:`kdjax.data.make_eval_iterator` (padded, masked).
    """
    name: str
    train_split: str
    eval_split: str
    sources: dict[str, Any]
    num_classes: int
    batch_size: int
    eval_batch_size: int
    seed: int
    train_transform: Any
    eval_transform: Any
    num_threads: int
    prefetch: int
    preprocessing: str
    sample_input: np.ndarray

    def num_examples(self, split: str) -> int:
        return len(self.sources[split])

    @property
    def steps_per_epoch(self) -> int:
        """``len(train) // batch_size`` (at least 1): the steps one epoch is counted as."""
        return max(1, self.num_examples(self.train_split) // self.batch_size)

    def train_iter(self):
        from kdjax import data

        return data.make_train_iterator(
            self.sources[self.train_split], global_batch_size=self.batch_size, seed=self.seed,
            transform=self.train_transform, num_threads=self.num_threads,
            prefetch_buffer_size=self.prefetch)

    def eval_iter(self, split: str | None = None):
        """One padded pass over ``split`` (default the eval split) with the eval transform."""
        from kdjax import data

        return data.make_eval_iterator(
            self.sources[split or self.eval_split], global_batch_size=self.eval_batch_size,
            transform=self.eval_transform, num_threads=self.num_threads,
            prefetch_buffer_size=self.prefetch)


def build_data(dataset: ml_collections.ConfigDict, seed: int) -> Data:
    """Opens the dataset named by ``config.dataset`` (sources, transforms, sample input).

    ConfigError when ImageNet is not prepared in ``dataset.data_dir`` (the message says how)."""
    import functools

    from kdjax import data

    splits = (dataset.train_split, dataset.eval_split)
    if dataset.name == "imagenet2012":
        try:
            sources = {s: data.imagenet_source(s, dataset.data_dir) for s in dict.fromkeys(splits)}
        except (FileNotFoundError, ValueError) as e:  # not prepared there; says how, on one line
            raise ConfigError(f"config.dataset.data_dir={dataset.data_dir!r}: "
                              f"{' '.join(str(e).split())}") from None
        train_tf = functools.partial(data.imagenet_train_transform, image_size=dataset.image_size)
        eval_tf = functools.partial(data.imagenet_eval_transform, image_size=dataset.image_size,
                                    resize_size=dataset.resize_size)
        source = sources[dataset.train_split]
        num_classes = int(source.dataset_info.features["label"].num_classes)
        sample = eval_tf(sources[dataset.eval_split][0])["image"][None]
        preprocessing = (f"resize{dataset.resize_size}-center{dataset.image_size}-"
                         f"imagenet-mean-std")
    else:
        if dataset.name == "mnist1d":
            arrays = data.mnist1d_arrays(num_samples=dataset.num_samples)
        else:
            arrays = data.digits_arrays()
        if dataset.rgb:
            arrays = {s: {**a, "image": np.repeat(a["image"], 3, axis=-1)} for s, a in arrays.items()}
        sources = {s: data.ArraySource(arrays[s]) for s in dict.fromkeys(splits)}
        train_tf, eval_tf = train_transform(dataset.augment), None
        num_classes = int(max(a["label"].max() for a in arrays.values())) + 1
        sample = arrays[dataset.eval_split]["image"][:1]
        preprocessing = f"{dataset.name}-standardised" + ("-rgb" if dataset.rgb else "")
        # The eval view (and a centre store) stays unaugmented; the train transform is in a view
        # store's own spec (its fingerprint), so ``preprocessing`` names the eval view only.
    return Data(name=dataset.name, train_split=dataset.train_split, eval_split=dataset.eval_split,
                sources=sources, num_classes=num_classes, batch_size=dataset.batch_size,
                eval_batch_size=dataset.eval_batch_size, seed=seed, train_transform=train_tf,
                eval_transform=eval_tf, num_threads=dataset.num_threads, prefetch=dataset.prefetch,
                preprocessing=preprocessing, sample_input=np.asarray(sample))
