"""Precomputed-teacher logit store: write a teacher's logits once, read them by example id.

A store is a directory::

    <store>/
      shards/shard-00000-of-00002/     one directory per writer process (process_index of process_count)
        spec.json                      the StoreSpec the writer was opened with (atomic write)
        ids.bin                        int64 [rows]           example id of every appended row
        values.bin                     dtype [rows, width]    width = num_classes ('full') or k ('topk')
        indices.bin                    int32 [rows, k]        class index of each value ('topk' only)
        progress.json                  {"rows": n}: the first n rows of every .bin file are durable
        DONE                           {"rows": n}: the writer closed cleanly after n rows
        LOCK                           pid@host of the writer holding the shard's flock
      index.npy                        int64 [num_examples, 2]: (shard, row) of every example id
      metadata.json                    spec, kdjax version, shard layout
      COMPLETE                         written last by finalize(); a store without it is never read

Rows are appended in arrival order, so a writer may receive any subset of ids (whatever the data
pipeline hands its process) and several processes write at once without sharing a file. Every
marker and JSON file is written to a temporary name, fsynced and renamed with ``os.replace``, so a
reader sees either the old or the new file, never a partial one. Data rows become durable only
when ``progress.json`` is replaced after the ``.bin`` files were fsynced: after a crash, bytes past
the committed row count are truncated away on resume (``resume=True``), and the ids already
committed are skipped. ``finalize`` (process 0, after every writer closed) checks that every id in
``[0, num_examples)`` was written exactly once, builds the id -> (shard, row) index and writes
``COMPLETE``.

A *view store* (``StoreSpec.epochs`` / ``seed`` / ``transform`` set) holds one row per
``(epoch, id)``: the teacher's outputs on the augmented view ``kdjax.data.train_example`` gives for
that epoch; its rows are keyed ``(epoch - first) * num_examples + id`` (what its ``ids.bin`` and
``index.npy`` hold), written from ``kdjax.data.make_view_iterator`` batches and read by each train
batch row's ``(epoch, id)``.

Values are stored as float16, bfloat16 (``ml_dtypes.bfloat16``, NumPy has no native bf16) or
float32; top-k indices as int32. See docs/logit_store.md.
"""
from kdjax.logit_store.finalize import finalize
from kdjax.logit_store.layout import LAYOUT_VERSION, is_complete
from kdjax.logit_store.precompute import precompute, store_outputs
from kdjax.logit_store.reader import PRECOMPUTE_COMMAND, LogitStore
from kdjax.logit_store.rows import topk_host
from kdjax.logit_store.spec import DTYPES, FORMATS, StoreSpec
from kdjax.logit_store.writer import LogitStoreWriter

__all__ = [
    "DTYPES",
    "FORMATS",
    "LAYOUT_VERSION",
    "PRECOMPUTE_COMMAND",
    "LogitStore",
    "LogitStoreWriter",
    "StoreSpec",
    "store_outputs",
    "finalize",
    "is_complete",
    "precompute",
    "topk_host",
]
