"""ImageNet (ILSVRC 2012) from TFDS ``imagenet2012`` in ArrayRecord format, read with grain.

Preparation (once, needs TensorFlow for the build only; see docs/data.md)::

    python -m kdjax.data.imagenet --manual_dir=$MANUAL --data_dir=$TFDS_DATA_DIR

``$MANUAL`` holds ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar``. This is the same as
``tfds build imagenet2012 --manual_dir=$MANUAL --data_dir=$TFDS_DATA_DIR --file_format=array_record``
(the ``tfds`` command line additionally needs ``apache-beam`` installed).

Reading uses ``tfds.data_source`` (random access into the ArrayRecord shards, no TensorFlow) with
the JPEG bytes left encoded; the transforms below decode them with Pillow in grain's reader
threads (Pillow releases the GIL while decoding and resizing). TFDS and Pillow are imported only
when used, so ``import kdjax.data`` needs neither.

Preprocessing matches torchvision's reference recipe (the teachers converted from torchvision
weights were trained and evaluated with it):

* train: ``RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3))`` with bilinear resampling,
  then a horizontal flip with probability 1/2, all drawn from ``example_rng(seed, epoch, id)``;
* eval: resize the shorter side to 256 (bilinear), then centre-crop 224;
* normalisation: ``(x / 255 - mean) / std`` with the ImageNet RGB ``MEAN_RGB`` / ``STD_RGB``,
  either on the host (default: ``image`` float32) or on the device: ``normalize_on_host=False``
  yields uint8 images (4x less host memory traffic and host-to-device transfer) and
  ``prefetch_to_device(..., device_fn=jax.jit(normalize_batch))`` normalises them on the device.
"""

from __future__ import annotations

import argparse
import functools
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdjax.data import pipeline

DATASET_NAME = "imagenet2012"
MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)
# (x / 255 - mean) / std == x * _SCALE + _OFFSET: one multiply-add per pixel.
_SCALE = (1.0 / (255.0 * np.asarray(STD_RGB))).astype(np.float32)
_OFFSET = (-np.asarray(MEAN_RGB) / np.asarray(STD_RGB)).astype(np.float32)
_TRAIN_TAR = "ILSVRC2012_img_train.tar"
_VAL_TAR = "ILSVRC2012_img_val.tar"


def _prepare_instructions(data_dir: str | None) -> str:
    target = data_dir or "$TFDS_DATA_DIR (default ~/tensorflow_datasets)"
    return (
        "Prepare it once (TensorFlow is needed for the build):\n"
        f"  1. put {_TRAIN_TAR} and {_VAL_TAR} (from https://image-net.org/download-images) in a "
        "manual directory $MANUAL;\n"
        f"  2. python -m kdjax.data.imagenet --manual_dir=$MANUAL --data_dir={target}\n"
        f"     (equivalently: tfds build {DATASET_NAME} --manual_dir=$MANUAL --data_dir={target} "
        "--file_format=array_record, which also needs `pip install apache-beam`).\n"
        "See docs/data.md."
    )


def prepare_imagenet(manual_dir: str, data_dir: str | None = None) -> str:
    """Build TFDS ``imagenet2012`` in ArrayRecord format from the ILSVRC tars in ``manual_dir``.

    Runs the real TFDS builder (``download_and_prepare`` with ``file_format='array_record'``); the
    validation labels come from the file TFDS ships. A no-op if the dataset is already prepared.

    Returns:
      The prepared dataset directory (``<data_dir>/imagenet2012/<version>``).
    """
    import tensorflow_datasets as tfds

    present = [name for name in (_TRAIN_TAR, _VAL_TAR) if os.path.isfile(os.path.join(manual_dir, name))]
    if not present:
        raise FileNotFoundError(
            f"neither {_TRAIN_TAR} nor {_VAL_TAR} is in manual_dir={manual_dir!r}. "
            + _prepare_instructions(data_dir)
        )
    builder = tfds.builder(DATASET_NAME, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    return os.fspath(builder.data_dir)


def imagenet_source(split: str, data_dir: str | None = None) -> Sequence[Mapping[str, Any]]:
    """Random-access TFDS data source over one full split of ``imagenet2012``.

    ``source[i]`` is ``{'image': JPEG bytes, 'label': int, 'file_name': bytes}``; ``i`` is the
    record index in the split, the stable example id (TFDS orders records by a hash of the file
    name at build time, so the index is the same for every build of the same version).

    Args:
      split: a full split name, ``'train'`` or ``'validation'`` (``'test'`` if built; labels -1).
      data_dir: TFDS data directory (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``): a
        path or a ``gs://`` URL, handed to TFDS unchanged (tests/test_data_imagenet.py reads one
        from a local fake GCS server).

    Raises:
      FileNotFoundError: the dataset is not prepared in ``data_dir`` (says how to prepare it).
      ValueError: it was prepared in another file format, or ``split`` is not a prepared split.
    """
    import tensorflow_datasets as tfds

    if not isinstance(split, str) or "[" in split or "+" in split:
        raise ValueError(
            f"split must be one full split name such as 'train' or 'validation', got {split!r}; "
            "sub-splits would renumber the example ids that key the teacher-logit store."
        )
    builder = tfds.builder(DATASET_NAME, data_dir=data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS {DATASET_NAME} is not prepared in {os.fspath(builder.data_dir)!r}. "
            + _prepare_instructions(data_dir)
        )
    file_format = builder.info.file_format
    if file_format is None or file_format.value != "array_record":
        found = file_format.value if file_format is not None else "unknown"
        raise ValueError(
            f"{DATASET_NAME} in {os.fspath(builder.data_dir)!r} is stored as {found!r}, but random "
            "access (tfds.data_source + grain) needs 'array_record'. Rebuild it into another data_dir "
            "with file_format='array_record'. " + _prepare_instructions(data_dir)
        )
    if split not in builder.info.splits:
        raise ValueError(
            f"split {split!r} of {DATASET_NAME} is not prepared; available: "
            f"{sorted(builder.info.splits)}. The builder makes 'train' from {_TRAIN_TAR} and "
            f"'validation' from {_VAL_TAR}; add the missing tar to the manual dir and rebuild."
        )
    return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


def tfds_string_id(source: Any, example_id: int) -> str:
    """TFDS-style string id of record ``example_id``: ``'<shard file name>__<index in shard>'``.

    The format of the ``tfds_id`` that TFDS's ``ReadConfig(add_tfds_id=True)`` attaches, computed
    from the split's shard lengths without reading the record. ``source[example_id]['file_name']``
    (the ILSVRC file name) is the other stable string key; it costs one record read.
    """
    split_info = source.dataset_info.splits[source.split]
    lengths = np.asarray(split_info.shard_lengths, np.int64)
    if not 0 <= example_id < int(lengths.sum()):
        raise ValueError(
            f"example_id must be in [0, {int(lengths.sum())}) for split {source.split!r}, got {example_id}."
        )
    shard = int(np.searchsorted(np.cumsum(lengths), example_id, side="right"))
    offset = int(lengths[:shard].sum())
    return f"{split_info.filenames[shard]}__{example_id - offset}"


def decode_rgb(jpeg: bytes) -> "PIL.Image.Image":
    """Decode JPEG bytes to an RGB Pillow image (grayscale JPEGs are expanded to 3 channels)."""
    from PIL import Image

    image = Image.open(io.BytesIO(jpeg))
    return image.convert("RGB")


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
    """Inception-style crop ``(top, left, crop_height, crop_width)``, torchvision's algorithm.

    Up to 10 tries: area ``A ~ U(scale) * height * width``, aspect ``r = exp(U(log ratio))``,
    ``w = round(sqrt(A r))``, ``h = round(sqrt(A / r))``; accepted if it fits, at a uniform position.
    Otherwise the largest centred crop whose aspect is clamped into ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, int(round(height * max(ratio)))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def normalize_image(image: Any) -> Any:
    """``(image / 255 - MEAN_RGB) / STD_RGB`` in float32; NumPy or JAX arrays, channels last.

    Computed as ``image * (1 / (255 std)) - mean / std``; on NumPy input in place in one float32
    buffer (about 3x faster on the host than the textbook expression).
    """
    if isinstance(image, np.ndarray):
        out = np.multiply(image, _SCALE, dtype=np.float32)
        out += _OFFSET
        return out
    return image.astype(np.float32) * _SCALE + _OFFSET


def normalize_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` with ``image`` normalised by :func:`normalize_image` (jit it for device use)."""
    out = dict(batch)
    out["image"] = normalize_image(batch["image"])
    return out


def _finish_image(image: "PIL.Image.Image", normalize: bool) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.uint8)
    return normalize_image(pixels) if normalize else pixels


def imagenet_train_transform(
    record: Mapping[str, Any],
    rng: np.random.Generator,
    *,
    image_size: int = 224,
    normalize: bool = True,
) -> dict[str, Any]:
    """Random-resized crop + horizontal flip of one record: ``image`` ``[S, S, 3]``, ``label``.

    A pure function of the record and the state of ``rng``; ``image`` is float32 normalised when
    ``normalize`` else uint8.
    """
    if rng is None:
        raise ValueError("imagenet_train_transform needs an rng; it is an augmentation (train only).")
    from PIL import Image

    image = decode_rgb(record["image"])
    top, left, crop_h, crop_w = random_resized_crop_box(rng, image.height, image.width)
    image = image.crop((left, top, left + crop_w, top + crop_h))
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return {"image": _finish_image(image, normalize), "label": record["label"]}


def imagenet_eval_transform(
    record: Mapping[str, Any],
    rng: np.random.Generator | None = None,
    *,
    image_size: int = 224,
    resize_size: int = 256,
    normalize: bool = True,
) -> dict[str, Any]:
    """Resize the shorter side to ``resize_size`` (bilinear), centre-crop ``image_size``; ignores rng."""
    from PIL import Image

    del rng
    image = decode_rgb(record["image"])
    short, long = sorted((image.width, image.height))
    scaled_long = int(resize_size * long / short)
    size = (resize_size, scaled_long) if image.width <= image.height else (scaled_long, resize_size)
    image = image.resize(size, Image.Resampling.BILINEAR)
    top = int(round((image.height - image_size) / 2.0))
    left = int(round((image.width - image_size) / 2.0))
    image = image.crop((left, top, left + image_size, top + image_size))
    return {"image": _finish_image(image, normalize), "label": record["label"]}


def imagenet_train_iterator(
    *,
    global_batch_size: int,
    seed: int,
    data_dir: str | None = None,
    split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    image_size: int = 224,
    normalize_on_host: bool = True,
    num_threads: int = 16,
    prefetch_buffer_size: int = 256,
):
    """Training batches of ImageNet: :func:`kdjax.data.make_train_iterator` on ``imagenet_source``.

    Yields ``{'image' [B, S, S, 3] float32 (uint8 if not normalize_on_host), 'label', 'id',
    'epoch', 'mask'}`` with ``B = global_batch_size // process_count``; checkpointable.
    """
    return pipeline.make_train_iterator(
        imagenet_source(split, data_dir),
        global_batch_size=global_batch_size,
        seed=seed,
        transform=functools.partial(
            imagenet_train_transform, image_size=image_size, normalize=normalize_on_host
        ),
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
        num_threads=num_threads,
        prefetch_buffer_size=prefetch_buffer_size,
    )


def imagenet_eval_iterator(
    *,
    global_batch_size: int,
    data_dir: str | None = None,
    split: str = "validation",
    process_index: int | None = None,
    process_count: int | None = None,
    image_size: int = 224,
    resize_size: int = 256,
    normalize_on_host: bool = True,
    num_threads: int = 16,
    prefetch_buffer_size: int = 256,
):
    """One padded pass over an ImageNet split: :func:`kdjax.data.make_eval_iterator`.

    Yields ``{'image', 'label', 'id', 'mask'}``; padding rows (``mask=False``) fill the last batch.
    """
    return pipeline.make_eval_iterator(
        imagenet_source(split, data_dir),
        global_batch_size=global_batch_size,
        transform=functools.partial(
            imagenet_eval_transform,
            image_size=image_size,
            resize_size=resize_size,
            normalize=normalize_on_host,
        ),
        process_index=process_index,
        process_count=process_count,
        num_threads=num_threads,
        prefetch_buffer_size=prefetch_buffer_size,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m kdjax.data.imagenet --manual_dir=DIR [--data_dir=DIR]``."""
    parser = argparse.ArgumentParser(description=prepare_imagenet.__doc__.splitlines()[0])
    parser.add_argument("--manual_dir", required=True, help=f"directory with {_TRAIN_TAR}, {_VAL_TAR}")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default $TFDS_DATA_DIR)")
    args = parser.parse_args(argv)
    path = prepare_imagenet(args.manual_dir, args.data_dir)
    print(f"prepared {DATASET_NAME} (array_record) at {path}")


if __name__ == "__main__":
    main()
