r"""FitNets (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015) on ImageNet.

Two stages, as in the paper (not the one-stage "hint + KD" sum of many codebases):

1. hint training: the student's layers up to its guided layer plus a regressor ``r`` are trained
   on ``1/2 ||u_h(x) - r(v_g(x))||^2`` against the teacher's hint layer ``u_h``; every other
   student parameter is frozen (``optax.set_to_zero``: no update, no weight decay);
2. KD of the whole student from stage 1's weights (regressor dropped):
   ``CE(y, p_s) + lambda * H(p_t^tau, p_s^tau)`` with lambda annealed linearly from 4 to 1 and
   tau = 3: the paper's values ("Parameter lambda in Eq. (2) was initialized to 4 and decayed
   linearly during 500 epochs reaching lambda = 1. The relaxation term tau was set to 3", App. A.1.2;
   no tau^2 factor). The paper anneals over 500 epochs, its maximum training length (it stops on a
   validation plateau); kdjax anneals over the stage's fixed length. Override
   ``fitnet.weight_start`` / ``weight_end`` / ``temperature``.

ARG keys: ``student=resnet101_w32|resnet34``, ``source=torchvision|train|checkpoint``, ``path=...``,
``smoke`` (digits + tiny CNNs, a few CPU steps)::

    --config=experiments/configs/imagenet_fitnet.py:path=/ckpt/resnet50.npz

Thin and deep (the paper's FitNets are both, Sec. 3): the teacher is ResNet-50 (25.6M parameters,
50 layers; stage outputs 256 / 512 / 1024 / 2048 channels) and the default student ResNet-101 at
half width, ``resnet101:width=32`` (11.7M parameters, 101 layers; stage outputs 128 / 256 / 512 /
1024 channels). ``student=resnet34`` keeps the earlier pairing (thinner,
21.8M parameters, but shallower than its teacher). The CPU-scale configs (``mnist1d_fitnet.py``,
``digits_fitnet.py``) have thin-and-deep students too (``cnn1d_thin_deep``, ``cnn2d_thin_deep``).

Hint / guided layers: ``stage2`` of both: "we choose the hint to be the middle layer of the teacher
network. Similarly, we choose the guided layer to be the middle layer of the student network"
(Sec. 2.2); 28 x 28 for 224 inputs. The regressor is convolutional (Sec. 2.2: kernel
``guided size - hint size + 1``, which is 1 x 1 when the sizes match, 256 -> 512 channels here) and
ends in a ReLU, because "u_h and r must be the same non-linearity" and the stage outputs are
post-ReLU. The hint loss is normalised by the number of feature elements (``fitnet.hint_normalize``;
the paper's ``1/2 ||.||^2`` sums): the same minimiser, one learning rate for any layer.
Stage 1: 10 epochs, cosine learning rate; stage 2: the standard 90-epoch recipe of the ESKD
configs (SGD 0.9, 0.1 x batch/256, wd 1e-4, /10 at 30 and 60). The optimiser and stage lengths are
kdjax's choices: the paper trains CIFAR-10 with RMSProp (lr 0.005, batch 128) until the validation
error stops improving (App. A.1.2) and reports no ImageNet number, so ``config.paper`` is empty.
"""

from __future__ import annotations

from experiments.configs import base

#: ARG ``student`` -> model spec.
STUDENTS = {"resnet101_w32": "resnet101:width=32", "resnet34": "resnet34"}
SMOKE = {"teacher": "cnn2d:width=8", "student": "cnn2d_thin_deep:width=4"}


def get_config(arg=None):
    """The locked FitNet config (see the module docstring for ``arg``)."""
    a = base.parse_arg(arg, student="resnet101_w32", source="torchvision", path="", smoke=False)
    if a.student not in STUDENTS:
        raise ValueError(f"config arg student={a.student!r}; valid: {', '.join(STUDENTS)}.")
    c = base.kd_config()
    c.experiment = "fitnet"
    c.name = f"imagenet_fitnet/resnet50->{a.student}"
    c.seed = 0
    base.imagenet_protocol(c)

    c.student.model = STUDENTS[a.student]
    c.teacher.model = "resnet50"
    c.teacher.source = a.source
    if a.path:
        c.teacher.path = a.path

    # Hint / guided layer stage2, 1x1 conv regressor ending in a ReLU, mean hint loss, tau 3,
    # lambda 4 -> 1, cosine stage 1: base.kd_config's FitNet defaults (the paper's, see above).
    c.fitnet.stage1_epochs = 10

    c.run.eval_every_epochs = 1
    c.run.checkpoint_every_epochs = 1
    c.run.log_every_steps = 100
    c.paper.source = "Romero et al., ICLR 2015 (no ImageNet result)"
    if a.smoke:
        base.smoke_on_digits(c, a.source)
        c.student.model = SMOKE["student"]
        c.teacher.model = SMOKE["teacher"]
        c.fitnet.hint_layer = "stage1"
        c.fitnet.guided_layer = "stage1"
        c.fitnet.stage1_epochs = 1
    return c.lock()
