"""Small real datasets for CPU-scale experiments: MNIST-1D and scikit-learn's 8x8 digits.

Both return ``{'train': {'image', 'label'}, 'test': {'image', 'label'}}`` of NumPy arrays, which
:class:`kdjax.data.ArraySource` turns into a source for the same grain pipeline as ImageNet::

    arrays = mnist1d_arrays()
    it = make_train_iterator(ArraySource(arrays['train']), global_batch_size=128, seed=0)

The example id of a row is its index in its split array.
"""

from __future__ import annotations

import functools
import random

import numpy as np


@functools.lru_cache(maxsize=4)
def _mnist1d(num_samples: int | None, seed: int) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    if num_samples is not None:
        args.num_samples = int(num_samples)
    args.seed = int(seed)
    # make_dataset seeds NumPy's and Python's global generators; restore them afterwards.
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return {key: data[key] for key in ("x", "y", "x_test", "y_test")}


def mnist1d_arrays(num_samples: int | None = None, seed: int = 42) -> dict[str, dict[str, np.ndarray]]:
    """MNIST-1D generated locally with ``mnist1d.data.make_dataset(get_dataset_args())``.

    Nothing is downloaded or written: ``make_dataset`` is called directly (not ``get_dataset``,
    which downloads and pickles), and the global random state it seeds is restored.

    Args:
      num_samples: total examples before the 80/20 train/test split; ``None`` keeps the published
        5000 (4000 train / 1000 test). Larger values give the larger variants (rounded down to a
        multiple of 10, one tenth per class).
      seed: generator seed; 42 is the published dataset.

    Returns:
      ``{'train': {'image': float32 [N, 40, 1], 'label': int32 [N]}, 'test': {...}}``; the signals
      are standardised by ``make_dataset`` (mean 0, std 1 over the whole generated set).
    """
    if num_samples is not None and (not isinstance(num_samples, (int, np.integer)) or num_samples < 10):
        raise ValueError(
            f"num_samples must be None (published 5000) or an integer >= 10 (one per class), "
            f"got {num_samples!r}."
        )
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    data = _mnist1d(None if num_samples is None else int(num_samples), int(seed))

    def split(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        return {"image": x.astype(np.float32)[..., None], "label": y.astype(np.int32)}

    return {"train": split(data["x"], data["y"]), "test": split(data["x_test"], data["y_test"])}


def digits_arrays(test_fraction: float = 0.2, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """scikit-learn's ``load_digits`` (1797 images, 8x8, 10 classes), split per class.

    Within each class, a ``np.random.default_rng(seed)`` permutation sends ``round(test_fraction *
    n_class)`` images to test and the rest to train; each split keeps the original (sklearn) order.
    Pixels (0..16) are standardised with the train split's scalar mean and std:
    ``image = (x - mean_train) / std_train``.

    Returns:
      ``{'train': {'image': float32 [N, 8, 8, 1], 'label': int32 [N]}, 'test': {...}}``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float64)
    labels = digits.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(labels.shape[0], dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        num_test = int(round(test_fraction * members.size))
        is_test[rng.permutation(members)[:num_test]] = True
    train_pixels = images[~is_test]
    mean, std = train_pixels.mean(), train_pixels.std()

    def split(mask: np.ndarray) -> dict[str, np.ndarray]:
        image = ((images[mask] - mean) / std).astype(np.float32)[..., None]
        return {"image": image, "label": labels[mask]}

    return {"train": split(~is_test), "test": split(is_test)}
