r"""FitNets (Romero et al., ICLR 2015): stage 1 trains the student up to its guided layer plus a
regressor on the teacher's hint (every other parameter frozen), stage 2 distils the whole student
with an annealed KD weight, starting from stage 1's weights.

Usage::

    python -m experiments.imagenet_fitnet \
        --config=experiments/configs/imagenet_fitnet.py \
        --config.teacher.path=/ckpt/resnet50.npz --config.dataset.data_dir=$TFDS_DATA_DIR \
        --workdir=/runs/fitnet [--distributed]

CPU-scale configs: ``experiments/configs/mnist1d_fitnet.py``, ``digits_fitnet.py``. Stages:
``teacher`` (``teacher.source=train``), ``fitnet_stage1``, ``fitnet_stage2``; resumable, a
preempted run exits 0; ``<workdir>/report.md`` at the end. See docs/experiments.md.
"""

from __future__ import annotations

import sys
from typing import Sequence

from experiments import cli, runs, validate

PROG = "python -m experiments.imagenet_fitnet"


def run(config, workdir: str) -> runs.RunOutcome:
    """Runs FitNet's two stages (see :func:`experiments.runs.run_fitnet`)."""
    return runs.run_fitnet(config, workdir)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; ``argv`` excludes the program name. Returns the exit status."""
    args = cli.parse_command_line(sys.argv[1:] if argv is None else argv, prog=PROG, doc=__doc__)
    validate.validate_config(args.config, "fitnet")
    cli.initialize(args)
    return cli.finish(args.config, run(args.config, args.workdir))


if __name__ == "__main__":
    cli.run_main(main)
