r"""KD experiments: a student from scratch, with full KD or with early-stopped KD (ESKD), optionally
through a teacher-assistant chain; the ESKD paper's ImageNet grid by default.

Usage (one grid cell per run; ``--config.key=value`` overrides any key)::

    python -m experiments.imagenet_eskd \
        --config=experiments/configs/imagenet_eskd.py:teacher=resnet34,mode=eskd \
        --config.teacher.path=/ckpt/resnet34.npz --config.dataset.data_dir=$TFDS_DATA_DIR \
        --workdir=/runs/eskd_r34 [--distributed]

The same entry point runs the CPU-scale configs (``experiments/configs/mnist1d_eskd.py``,
``digits_eskd.py``). Stages run in order, each resumable (``<workdir>/stages/<name>``):
``teacher`` (``teacher.source=train``), ``assistant1`` .. (``config.assistants``), ``student``.
Rerunning the same command resumes; a preempted run exits 0. At the end ``<workdir>/report.md``
holds the result table (with the paper's number for the cell and the early-stopping reading used)
and plots. See docs/experiments.md.
"""

from __future__ import annotations

import sys
from typing import Sequence

from experiments import cli, runs, validate

PROG = "python -m experiments.imagenet_eskd"


def run(config, workdir: str) -> runs.RunOutcome:
    """Runs the KD experiment of ``config`` in ``workdir`` (see :func:`experiments.runs.run_kd`)."""
    return runs.run_kd(config, workdir)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; ``argv`` excludes the program name. Returns the exit status."""
    args = cli.parse_command_line(sys.argv[1:] if argv is None else argv, prog=PROG, doc=__doc__)
    validate.validate_config(args.config, "kd")
    cli.initialize(args)
    return cli.finish(args.config, run(args.config, args.workdir))


if __name__ == "__main__":
    cli.run_main(main)
