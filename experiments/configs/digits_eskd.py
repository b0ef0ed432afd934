"""ESKD / KD / teacher-assistant grid on digits (CPU scale); see experiments/configs/small.py.

    python -m experiments.imagenet_eskd --config=experiments/configs/digits_eskd.py:teacher=large,mode=eskd \
        --workdir=/tmp/digits_eskd

ARG: teacher=none|small|medium|large, mode=scratch|full|eskd, reading=stop_kd|early_teacher,
source=train|checkpoint, path=DIR, precomputed, store=DIR, ta=SIZE+SIZE (assistants), smoke.
"""

from experiments.configs import small


def get_config(arg=None):
    return small.eskd_config("digits", arg)
