"""``python -m experiments.detection_kd``: see :mod:`experiments.detection_kd`."""

from experiments.cli import run_main
from experiments.detection_kd import main

run_main(main)
