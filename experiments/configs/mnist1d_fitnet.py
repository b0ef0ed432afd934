"""FitNet (hint stage, then KD) on mnist1d (CPU scale) with a thin-and-deep student; see
experiments/configs/small.py.

    python -m experiments.imagenet_fitnet --config=experiments/configs/mnist1d_fitnet.py --workdir=/tmp/mnist1d_fitnet

ARG: source=train|checkpoint, path=DIR, smoke.
"""

from experiments.configs import small


def get_config(arg=None):
    return small.fitnet_config("mnist1d", arg)
