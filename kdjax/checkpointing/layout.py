"""Names on disk: the orbax items of one checkpoint step and the partial/corrupt suffixes."""

from __future__ import annotations

import orbax.checkpoint as ocp

_STATE = "state"
_INTEGRITY = "integrity"
_DATA = "data"
_METRICS = ocp.checkpoint_manager.METRIC_ITEM_NAME  # orbax writes <step>/metrics/metrics
_TMP_MARKER = ".orbax-checkpoint-tmp"
_CORRUPT_SUFFIX = ".corrupt"
