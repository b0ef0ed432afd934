"""Host input-pipeline throughput (images/s, total and per core) on a tiny imagenet2012.

Unless ``--data_dir`` points at a prepared ``imagenet2012`` (ArrayRecord), the script writes fake
ILSVRC tars of ImageNet-sized JPEGs (smooth random colour fields plus noise, default 500x375, the
typical ImageNet size) into a temporary directory and prepares them with the real TFDS builder
(needs TensorFlow). It then times the real pipeline (``kdjax.data.imagenet_train_iterator`` /
``imagenet_eval_iterator``): JPEG decode, crop/resize/flip, optional normalisation, batching.

Per-core throughput is measured directly with ``num_threads=0`` (everything in the consuming
thread, one core); the threaded run is also reported divided by the cores this process may use.

    python benchmarks/input_pipeline.py [--json results.json] [--data_dir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image


def _smooth_jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
    """A JPEG that compresses like a photograph: an upsampled random colour field plus noise."""
    coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8))
    field = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    pixels = np.clip(field + rng.normal(0.0, 8.0, size=field.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_fake_ilsvrc(manual_dir: str, num_classes: int, per_class: int, num_val: int,
                      height: int, width: int, seed: int = 0) -> None:
    """ILSVRC2012_img_train.tar (per-class tars) and ILSVRC2012_img_val.tar in ``manual_dir``."""
    import tensorflow_datasets as tfds

    labels_file = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "labels.txt")
    with open(labels_file) as f:
        synsets = f.read().split()[:num_classes]
    rng = np.random.default_rng(seed)
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
        for synset in synsets:
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for k in range(per_class):
                    _add(inner, f"{synset}_{k + 1}.JPEG", _smooth_jpeg(rng, height, width))
            _add(outer, f"{synset}.tar", inner_bytes.getvalue())
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
        for k in range(num_val):
            _add(tar, f"ILSVRC2012_val_{k + 1:08d}.JPEG", _smooth_jpeg(rng, height, width))


def time_iterator(iterator, num_batches: int, warmup: int = 2) -> tuple[float, int]:
    """Seconds for ``num_batches`` batches after ``warmup`` untimed ones, and images timed."""
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    images = 0
    for _ in range(num_batches):
        images += next(iterator)["image"].shape[0]
    return time.perf_counter() - start, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None, help="prepared TFDS dir; default: build a tiny set")
    parser.add_argument("--num_classes", type=int, default=4)
    parser.add_argument("--per_class", type=int, default=24)
    parser.add_argument("--num_val", type=int, default=48)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_batches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=16, help="grain reader threads (threaded run)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    args = parser.parse_args()

    from kdjax import data

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            manual, data_dir = os.path.join(tmp, "manual"), os.path.join(tmp, "tfds")
            os.makedirs(manual)
            write_fake_ilsvrc(manual, args.num_classes, args.per_class, args.num_val, args.height, args.width)
            data.prepare_imagenet(manual, data_dir)
        cases = {
            "train_normalize_on_host": lambda threads: data.imagenet_train_iterator(
                global_batch_size=args.batch_size, seed=0, data_dir=data_dir, process_index=0,
                process_count=1, num_threads=threads),
            "train_uint8": lambda threads: data.imagenet_train_iterator(
                global_batch_size=args.batch_size, seed=0, data_dir=data_dir, process_index=0,
                process_count=1, num_threads=threads, normalize_on_host=False),
            "eval_normalize_on_host": lambda threads: _endless_eval(data, data_dir, args.batch_size, threads),
        }
        results = []
        for name, make in cases.items():
            one_seconds, one_images = time_iterator(make(0), args.num_batches)
            many_seconds, many_images = time_iterator(make(args.threads), args.num_batches)
            results.append({
                "case": name,
                "images_per_s_one_core": one_images / one_seconds,
                "images_per_s_threaded": many_images / many_seconds,
                "threaded_images_per_s_per_core": many_images / many_seconds / cores,
            })
    report = {
        "machine": platform.processor() or platform.machine(),
        "cores_available": cores,
        "threads": args.threads,
        "image_size_source": [args.height, args.width],
        "batch_size": args.batch_size,
        "num_batches_timed": args.num_batches,
        "results": results,
    }
    print(f"cores available: {cores}; source JPEGs {args.height}x{args.width}; batch {args.batch_size}")
    print(f"{'case':<26}{'img/s 1 core':>14}{'img/s threaded':>16}{'per core':>10}")
    for row in results:
        print(f"{row['case']:<26}{row['images_per_s_one_core']:>14.1f}"
              f"{row['images_per_s_threaded']:>16.1f}{row['threaded_images_per_s_per_core']:>10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def _endless_eval(data, data_dir: str, batch_size: int, threads: int):
    """Eval batches, restarting the (finite) eval pass as often as needed."""
    while True:
        yield from data.imagenet_eval_iterator(global_batch_size=batch_size, data_dir=data_dir,
                                               process_index=0, process_count=1, num_threads=threads)


if __name__ == "__main__":
    main()
