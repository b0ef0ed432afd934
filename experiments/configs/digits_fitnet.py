"""FitNet (hint stage, then KD) on digits (CPU scale) with a thin-and-deep student; see
experiments/configs/small.py.

    python -m experiments.imagenet_fitnet --config=experiments/configs/digits_fitnet.py --workdir=/tmp/digits_fitnet

ARG: source=train|checkpoint, path=DIR, smoke.
"""

from experiments.configs import small


def get_config(arg=None):
    return small.fitnet_config("digits", arg)
