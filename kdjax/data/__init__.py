"""Input pipelines: grain over random-access sources, per-host sharding, resumable iterators.

``pipeline``: the shared machinery (:func:`make_train_iterator`, :func:`make_eval_iterator`,
:func:`prefetch_to_device`, :class:`ArraySource`). ``imagenet``: TFDS ``imagenet2012`` through
``tfds.data_source`` (TensorFlow Datasets is imported only when an ImageNet source is opened).
``small``: MNIST-1D and scikit-learn digits as in-memory arrays. See docs/data.md.
"""

from kdjax.data.imagenet import (
    MEAN_RGB,
    STD_RGB,
    imagenet_eval_iterator,
    imagenet_eval_transform,
    imagenet_source,
    imagenet_train_iterator,
    imagenet_train_transform,
    normalize_batch,
    normalize_image,
    prepare_imagenet,
    random_resized_crop_box,
    tfds_string_id,
)
from kdjax.data.pipeline import (
    ArraySource,
    DevicePrefetchIterator,
    eval_num_batches,
    example_rng,
    local_batch_size,
    make_eval_iterator,
    make_train_iterator,
    make_view_iterator,
    prefetch_to_device,
    train_example,
    view_num_batches,
)
from kdjax.data.fingerprint import transform_fingerprint
from kdjax.data.small import digits_arrays, mnist1d_arrays

__all__ = [
    "MEAN_RGB",
    "STD_RGB",
    "ArraySource",
    "DevicePrefetchIterator",
    "digits_arrays",
    "eval_num_batches",
    "example_rng",
    "imagenet_eval_iterator",
    "imagenet_eval_transform",
    "imagenet_source",
    "imagenet_train_iterator",
    "imagenet_train_transform",
    "local_batch_size",
    "make_eval_iterator",
    "make_train_iterator",
    "make_view_iterator",
    "mnist1d_arrays",
    "normalize_batch",
    "normalize_image",
    "prefetch_to_device",
    "prepare_imagenet",
    "random_resized_crop_box",
    "tfds_string_id",
    "train_example",
    "transform_fingerprint",
    "view_num_batches",
]
