"""Detection data in one record layout: scikit-learn digits placed on canvases, and TFDS ``voc/2007`` /
``coco/2017`` resized into the same canvases.

A record (and, stacked, a batch) is::

    image   float32 [S, S, 3]   in [0, 1], the canvas (S = canvas_size; padding is 0)
    boxes   float32 [G, 4]      pixels, (x1, y1, x2, y2), x2 > x1, y2 > y1, inside the canvas
    labels  int32   [G]         data classes in [0, K) (the detector adds background itself)
    valid   bool    [G]         True for real objects; padding rows hold zero boxes and label 0
    label   int32   []          the object count (the key kdjax's grain pipeline requires)

``G = max_objects``, fixed, so batches stack and ``jit`` sees one shape;
:func:`kdjax.detection.targets.check_ground_truth` accepts every record.

* :func:`digits_detection_arrays`: a deterministic set built offline from a seed: the 8x8 digits
  of :func:`kdjax.data.digits_arrays` (its per-class train/test split, so test canvases hold unseen
  glyphs), each upscaled by an integer factor (nearest neighbour, so every ink pixel stays inside the
  box), pasted (pixelwise max) on a dark canvas at random positions with bounded overlap, plus clutter
  (fragments of other glyphs that are not objects) and Gaussian noise. The box of an object is the
  tight box of its glyph's ink. ``{'train': arrays, 'test': arrays}`` of NumPy arrays:
  ``kdjax.data.ArraySource(arrays['train'])`` runs them through the grain pipeline.
* :func:`tfds_detection_source`: a random-access source over a prepared TFDS detection dataset
  whose records are mapped by :func:`tfds_record` (for a pod run of the same experiment).

Through kdjax's grain pipeline (:func:`kdjax.data.make_train_iterator` / ``make_eval_iterator``)
pass ``transform=keep_record`` (or :func:`random_horizontal_flip` for VOC/COCO training; not for
digits, whose mirror images are not digits): without a transform the pipeline keeps only ``image``
and ``label``. Eval padding rows come with ``mask=False`` (their boxes are a real record's).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: TFDS detection datasets this module maps, with their class counts.
TFDS_NUM_CLASSES = {"voc/2007": 20, "coco/2017": 80}
NUM_DIGIT_CLASSES = 10


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {name}={value!r}")
    return int(value)


def _glyphs(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Ink in [0, 1] ``[N, 8, 8]`` and labels of a split of :func:`kdjax.data.digits_arrays`."""
    from kdjax.data.small import digits_arrays

    arrays = digits_arrays()
    # digits_arrays standardises by one affine map; raw 0 and 16 both occur, so min/max undo it
    everything = np.concatenate([arrays[s]["image"] for s in ("train", "test")])
    low, high = everything.min(), everything.max()
    ink = (arrays[split]["image"][..., 0] - low) / (high - low)
    return np.clip(ink, 0.0, 1.0).astype(np.float32), arrays[split]["label"]


def _ink_box(glyph: np.ndarray) -> tuple[int, int, int, int]:
    """Tight ``(r0, c0, r1, c1)`` (end-exclusive) of a glyph's non-zero pixels."""
    rows, cols = np.flatnonzero(glyph.any(1)), np.flatnonzero(glyph.any(0))
    return rows[0], cols[0], rows[-1] + 1, cols[-1] + 1


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one ``(x1, y1, x2, y2)`` box with ``[M, 4]`` boxes."""
    w = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    inter = w * h
    return inter / (area(box) + area(others) - inter)


def render_canvas(rng: np.random.Generator, glyphs: np.ndarray, labels: np.ndarray, *, canvas_size: int,
                  max_objects: int, scales: Sequence[int], max_overlap: float, clutter: int,
                  noise: float) -> dict[str, np.ndarray]:
    """One canvas (module docstring's record) drawn with ``rng`` from ``glyphs`` ``[N, 8, 8]`` (ink in
    [0, 1]) and their ``labels``.

    ``1 .. max_objects`` objects: a random glyph, an integer scale from ``scales``, a random position
    whose box overlaps every earlier one by IoU ``<= max_overlap`` (20 tries, else the object is left
    out); ``clutter`` fragments (a random 3x3 cell block of another glyph, same scales) that are not
    objects; then ``N(0, noise^2)`` on every pixel, clipped to [0, 1].
    """
    image = np.zeros((canvas_size, canvas_size), np.float32)
    boxes = np.zeros((max_objects, 4), np.float32)
    classes = np.zeros((max_objects,), np.int32)
    count = 0
    for _ in range(int(rng.integers(1, max_objects + 1))):
        index, scale = int(rng.integers(len(glyphs))), int(rng.choice(scales))
        glyph = np.kron(glyphs[index], np.ones((scale, scale), np.float32))
        r0, c0, r1, c1 = _ink_box(glyph)
        for _ in range(20):
            y, x = rng.integers(0, canvas_size - glyph.shape[0] + 1, size=2)
            box = np.array([x + c0, y + r0, x + c1, y + r1], np.float32)
            if count == 0 or _iou(box, boxes[:count]).max() <= max_overlap:
                image[y:y + glyph.shape[0], x:x + glyph.shape[1]] = np.maximum(
                    image[y:y + glyph.shape[0], x:x + glyph.shape[1]], glyph)
                boxes[count], classes[count] = box, labels[index]
                count += 1
                break
    for _ in range(clutter):
        scale = int(rng.choice(scales))
        r, c = rng.integers(0, 6, size=2)
        piece = np.kron(glyphs[int(rng.integers(len(glyphs)))][r:r + 3, c:c + 3], np.ones((scale, scale), np.float32))
        y, x = rng.integers(0, canvas_size - piece.shape[0] + 1, size=2)
        image[y:y + piece.shape[0], x:x + piece.shape[1]] = np.maximum(
            image[y:y + piece.shape[0], x:x + piece.shape[1]], 0.5 * piece)
    if noise > 0:
        image = np.clip(image + noise * rng.standard_normal(image.shape).astype(np.float32), 0.0, 1.0)
    valid = np.arange(max_objects) < count
    return {"image": np.repeat(image[..., None], 3, axis=-1), "boxes": boxes, "labels": classes, "valid": valid,
            "label": np.int32(count)}


def _stack(records: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([r[key] for r in records]) for key in records[0]}


@functools.lru_cache(maxsize=4)
def _digits_detection(num_train, num_test, canvas_size, max_objects, scales, max_overlap, clutter, noise, seed):
    out = {}
    for split_index, (split, count) in enumerate((("train", num_train), ("test", num_test))):
        glyphs, labels = _glyphs(split)
        out[split] = _stack([render_canvas(np.random.default_rng([seed, split_index, i]), glyphs, labels,
                                           canvas_size=canvas_size, max_objects=max_objects, scales=scales,
                                           max_overlap=max_overlap, clutter=clutter, noise=noise)
                             for i in range(count)])
    return out


def digits_detection_arrays(num_train: int = 2000, num_test: int = 500, *, canvas_size: int = 64,
                            max_objects: int = 4, scales: Sequence[int] = (2, 3, 4), max_overlap: float = 0.3,
                            clutter: int = 2, noise: float = 0.05, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """The digits detection set (module docstring): ``{'train': arrays, 'test': arrays}``.

    Canvas ``i`` of split ``s`` is :func:`render_canvas` with ``np.random.default_rng([seed, s, i])``
    (``s`` = 0 train, 1 test), so a canvas does not depend on how many others are made. Defaults
    (kdjax's choice, for 64 px canvases and stride-8 detectors): glyphs 16-32 px, up to 4 objects,
    IoU between objects <= 0.3, 2 clutter fragments, noise std 0.05. The arrays are cached (read-only
    copies are the caller's to make).

    Returns:
      per split ``{'image': float32 [N, S, S, 3], 'boxes': float32 [N, G, 4], 'labels': int32 [N, G],
      'valid': bool [N, G], 'label': int32 [N]}`` with ``S = canvas_size``, ``G = max_objects``.
    """
    num_train, num_test = _positive_int(num_train, "num_train"), _positive_int(num_test, "num_test")
    max_objects = _positive_int(max_objects, "max_objects")
    clutter = _positive_int(clutter, "clutter", minimum=0)
    seed = _positive_int(seed, "seed", minimum=0)
    scales = tuple(_positive_int(s, "each of scales") for s in scales)
    if not scales:
        raise ValueError("scales must name at least one integer upscaling factor, e.g. (2, 3, 4)")
    canvas_size = _positive_int(canvas_size, "canvas_size")
    if canvas_size < 8 * max(scales):
        raise ValueError(f"canvas_size={canvas_size} cannot hold a glyph at scale {max(scales)} "
                         f"({8 * max(scales)} px): use canvas_size >= {8 * max(scales)} or smaller scales")
    if not 0.0 <= max_overlap <= 1.0:
        raise ValueError(f"max_overlap is an IoU and must lie in [0, 1]; got {max_overlap!r}")
    if not (np.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise is a standard deviation and must be finite and >= 0; got {noise!r}")
    return _digits_detection(num_train, num_test, canvas_size, max_objects, scales, float(max_overlap), clutter,
                             float(noise), seed)


def keep_record(record: Mapping[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
    """The pipeline transform that keeps every key of a record (``rng`` unused)."""
    del rng
    return dict(record)


def random_horizontal_flip(record: Mapping[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
    """Faster R-CNN's training augmentation as a pipeline transform: with probability 1/2 (drawn from
    the example's ``rng``; ``None``, i.e. eval: never) mirror the canvas left-right and map each valid
    box to ``(S - x2, y1, S - x1, y2)`` (``S`` the canvas width); padding rows stay zero."""
    out = dict(record)
    if rng is None or rng.random() >= 0.5:
        return out
    width = record["image"].shape[1]
    boxes = np.asarray(record["boxes"])
    flipped = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=-1)
    out["image"] = np.ascontiguousarray(record["image"][:, ::-1])
    out["boxes"] = np.where(np.asarray(record["valid"])[:, None], flipped, 0.0).astype(boxes.dtype)
    return out


def tfds_record(record: Mapping[str, Any], *, canvas_size: int, max_objects: int,
                min_box_size: float = 1.0) -> dict[str, np.ndarray]:
    """A decoded TFDS detection record (``voc``, ``coco``: ``image`` uint8 ``[H, W, 3]``, ``objects``
    with ``bbox`` float ``[n, 4]`` normalised ``(ymin, xmin, ymax, xmax)`` and ``label`` ``[n]``,
    optionally ``is_crowd``) in the module's layout.

    The image is resized (bilinear, PIL) by ``canvas_size / max(H, W)`` to fit the canvas, keeping its
    aspect ratio, at the top-left, zero-padded; a box becomes ``(xmin W', ymin H', xmax W', ymax H')``
    on the resized ``H' x W'`` image. Crowd boxes (COCO ``is_crowd``) and boxes with a side below
    ``min_box_size`` px after resizing are dropped; the first ``max_objects`` remaining objects are
    kept (the rest are left out).

    Raises:
      ValueError: a record without the keys, boxes and labels of different counts, or a box outside
        [0, 1] or with ``ymax < ymin`` / ``xmax < xmin``.
    """
    from PIL import Image

    image = np.asarray(record["image"])
    objects = record.get("objects")
    if image.ndim != 3 or image.shape[-1] != 3 or objects is None or "bbox" not in objects or "label" not in objects:
        raise ValueError("a TFDS detection record needs 'image' [H, W, 3] and 'objects' with 'bbox' and 'label' "
                         f"(voc, coco); got keys {sorted(record)} and image shape {image.shape}")
    bbox = np.asarray(objects["bbox"], np.float64).reshape(-1, 4)
    label = np.asarray(objects["label"]).reshape(-1)
    if bbox.shape[0] != label.shape[0]:
        raise ValueError(f"the record has {bbox.shape[0]} boxes but {label.shape[0]} labels; each object needs both")
    ymin, xmin, ymax, xmax = bbox.T
    if bbox.size and (bbox.min() < 0 or bbox.max() > 1 or np.any(ymax < ymin) or np.any(xmax < xmin)):
        raise ValueError("TFDS boxes must be normalised (ymin, xmin, ymax, xmax) in [0, 1] with ymin <= ymax and "
                         f"xmin <= xmax; got {bbox.tolist()}")
    height, width = image.shape[:2]
    scale = canvas_size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = np.asarray(Image.fromarray(image.astype(np.uint8)).resize((new_w, new_h), Image.BILINEAR))
    canvas = np.zeros((canvas_size, canvas_size, 3), np.float32)
    canvas[:new_h, :new_w] = resized.astype(np.float32) / 255.0
    pixels = np.stack([xmin * new_w, ymin * new_h, xmax * new_w, ymax * new_h], axis=-1)
    keep = ((pixels[:, 2] - pixels[:, 0]) >= min_box_size) & ((pixels[:, 3] - pixels[:, 1]) >= min_box_size)
    if "is_crowd" in objects:
        keep &= ~np.asarray(objects["is_crowd"], bool).reshape(-1)
    pixels, label = pixels[keep][:max_objects], label[keep][:max_objects]
    count = pixels.shape[0]
    boxes = np.zeros((max_objects, 4), np.float32)
    labels = np.zeros((max_objects,), np.int32)
    boxes[:count], labels[:count] = pixels, label
    return {"image": canvas, "boxes": boxes, "labels": labels, "valid": np.arange(max_objects) < count,
            "label": np.int32(count)}


class TFDSDetectionSource:
    """Random access over a TFDS detection split, each record mapped by :func:`tfds_record`; the
    interface of :class:`kdjax.data.ArraySource` (``len``, ``source[i]``), ids = TFDS record indices."""

    def __init__(self, records: Sequence[Mapping[str, Any]], **mapping: Any):
        self._records = records
        self._mapping = mapping

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return tfds_record(self._records[int(index)], **self._mapping)


def tfds_detection_source(name: str, split: str, *, canvas_size: int = 512, max_objects: int = 100,
                          min_box_size: float = 1.0, data_dir: str | None = None) -> TFDSDetectionSource:
    """A :class:`TFDSDetectionSource` over ``tfds.data_source(name, split=split)`` (``name`` in
    :data:`TFDS_NUM_CLASSES`; prepared in ``data_dir`` as ``array_record``, e.g. ``tfds build
    voc/2007 --file_format=array_record``). Defaults (kdjax's choice): 512 px canvases, 100 objects."""
    if name not in TFDS_NUM_CLASSES:
        raise ValueError(f"unknown TFDS detection dataset {name!r}; mapped: {', '.join(TFDS_NUM_CLASSES)}")
    canvas_size = _positive_int(canvas_size, "canvas_size")
    max_objects = _positive_int(max_objects, "max_objects")
    import tensorflow_datasets as tfds

    records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    return TFDSDetectionSource(records, canvas_size=canvas_size, max_objects=max_objects, min_box_size=min_box_size)
