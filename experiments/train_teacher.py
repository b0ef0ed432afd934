r"""Train a teacher on labels with the same modules, keeping early-epoch snapshots.

Trains ``config.teacher.model`` (any experiment config: its dataset, optimizer and
``teacher.num_epochs`` or ``num_epochs``) and exports its variables at the end
(``<workdir>/stages/teacher/final``) and after each epoch in ``teacher.early_epoch`` and
``run.save_epochs`` (``<workdir>/stages/teacher/epochs/epoch_<E>``). Use the workdir as a teacher
with ``--config.teacher.source=checkpoint --config.teacher.path=<workdir>`` (plus
``teacher.early_epoch`` for ESKD's early-teacher reading)::

    python -m experiments.train_teacher \
        --config=experiments/configs/imagenet_eskd.py:teacher=resnet50,mode=eskd,reading=early_teacher \
        --config.dataset.data_dir=$TFDS_DATA_DIR --workdir=/runs/teacher_r50

Resumable; a preempted run exits 0; ``report.md`` at the end.
"""

from __future__ import annotations

import sys
from typing import Sequence

from experiments import cli, runs, validate

PROG = "python -m experiments.train_teacher"


def run(config, workdir: str) -> runs.RunOutcome:
    """Trains ``config.teacher.model`` (see :func:`experiments.runs.run_teacher`)."""
    return runs.run_teacher(config, workdir)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; ``argv`` excludes the program name. Returns the exit status."""
    args = cli.parse_command_line(sys.argv[1:] if argv is None else argv, prog=PROG, doc=__doc__)
    validate.validate_config(args.config, "teacher")
    cli.initialize(args)
    return cli.finish(args.config, run(args.config, args.workdir))


if __name__ == "__main__":
    cli.run_main(main)
