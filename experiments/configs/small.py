"""CPU-scale versions of the ESKD and FitNet protocols on MNIST-1D and scikit-learn digits.

Shared by ``mnist1d_eskd.py``, ``digits_eskd.py``, ``mnist1d_fitnet.py`` and ``digits_fitnet.py``.
Every run takes seconds to a minute on two CPU cores; the teachers are trained in the run
(``teacher.source='train'``) unless ``source=checkpoint,path=...`` points at a ``train_teacher``
workdir.

The schedule mirrors the ImageNet recipe scaled down: SGD with momentum 0.9, weight decay 5e-4,
learning rate divided by 10 after 1/3 and 2/3 of the epochs (ImageNet: 30 and 60 of 90); ESKD's
stop epoch at 2/3 (ImageNet: 60 of 90) and the early-teacher epoch at ~0.4 (ImageNet: 35 of 90).
T = 4, KD weight 0.9, CE weight 0.1 as in the ImageNet configs.

FitNet: stage 1 for 1/3 of the student's epochs, stage 2 with the ImageNet FitNet config's KD
(tau = 3, lambda 4 -> 1). At the ESKD learning rates the thin-and-deep CNNs (no BatchNorm) lost
all their ReLUs in stage 2 in our runs, so the MNIST-1D FitNet config uses half of that rate. Digits
uses 0.1 for the ESKD grid: at 0.4 (its first setting) the KD students stalled (full KD from the
small teacher: 31% test top-1 after 60 epochs against 90% from scratch, seed 0), and 0.05 for the
FitNet student (at 0.1 its thin-and-deep CNN died in 5 of 30 runs). Every FitNet teacher trains at
its grid's ESKD rate (``teacher.lr``). The MNIST-1D student is 16 channels wide because with 8
channels x 9 layers FitNet stayed below the same student trained from scratch at every rate we
tried.

All of these are kdjax's choices for small data, not numbers from the papers (which have no
MNIST-1D / digits experiments). Published MNIST-1D baselines for context: logistic regression
~32%, MLP ~68%, CNN ~94% test accuracy (Greydanus & Kobak, ICML 2024).
"""

from __future__ import annotations

from experiments.configs import base

#: dataset -> protocol sizes. Teachers: three widths of the same CNN family; one small student.
SETTINGS = {
    "mnist1d": dict(
        student="cnn1d:width=8",
        teachers={"small": "cnn1d:width=16", "medium": "cnn1d:width=48", "large": "cnn1d:width=128"},
        epochs=30, decay=(10, 20), stop=20, early=12, lr=0.1, batch=128, eval_batch=256,
        fitnet_teacher="cnn1d:width=64", fitnet_student="cnn1d_thin_deep:width=16",
        fitnet_layer="stage2", stage1_epochs=10, fitnet_lr=0.05),
    "digits": dict(
        student="cnn2d:width=4",
        teachers={"small": "cnn2d:width=8", "medium": "cnn2d:width=16", "large": "cnn2d:width=32"},
        epochs=60, decay=(20, 40), stop=40, early=23, lr=0.1, batch=128, eval_batch=384,
        fitnet_teacher="cnn2d:width=32", fitnet_student="cnn2d_thin_deep", fitnet_layer="stage1",
        stage1_epochs=20, fitnet_lr=0.05),
}
TEACHER_NAMES = ("none", "small", "medium", "large")


def _common(dataset: str) -> tuple:
    s = SETTINGS[dataset]
    c = base.kd_config()
    c.seed = 0
    c.num_epochs = s["epochs"]
    c.dataset.name = dataset
    c.dataset.train_split = "train"
    c.dataset.eval_split = "test"
    c.dataset.batch_size = s["batch"]
    c.dataset.eval_batch_size = s["eval_batch"]
    c.dataset.num_threads = 0
    c.optimizer.name = "sgd"
    c.optimizer.lr = s["lr"]
    c.optimizer.lr_batch = 256
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "step"
    c.optimizer.decay_epochs = s["decay"]
    c.optimizer.decay_factor = 0.1
    c.student.model = s["student"]
    # KD: base.kd_config's T = 4, weight 0.9, CE weight 0.1 (the ImageNet configs').
    c.run.eval_every_epochs = 2
    c.run.checkpoint_every_epochs = 10
    c.run.log_every_steps = 10
    c.run.progress = True
    c.paper.source = ""
    return c, s


def _smoke(c) -> None:
    """Two epochs of everything, a few steps each: CI keeps the entry points from rotting."""
    c.name += "/smoke"
    c.num_epochs = 2
    c.optimizer.decay_epochs = (1,)
    c.run.eval_every_epochs = 1
    c.run.checkpoint_every_epochs = 1
    c.run.log_every_steps = 5
    c.run.progress = False
    if c.teacher.source == "train":
        c.teacher.num_epochs = 2
    if c.kd.stop_epoch is not None:
        c.kd.stop_epoch = 1
    if c.teacher.early_epoch is not None:
        c.teacher.early_epoch = 1
    c.fitnet.stage1_epochs = 1


def eskd_config(dataset: str, arg=None):
    """ESKD grid on ``dataset``. ARG: ``teacher=none|small|medium|large``, ``mode=scratch|full|eskd``,
    ``reading=stop_kd|early_teacher``, ``source=train|checkpoint``, ``path=DIR``, ``precomputed``,
    ``store=DIR``, ``ta=small+medium`` (assistant sizes, largest first), ``smoke``."""
    a = base.parse_arg(arg, teacher="large", mode="eskd", reading="stop_kd", source="train", path="",
                       precomputed=False, store="", ta="", smoke=False)
    if a.teacher not in TEACHER_NAMES:
        raise ValueError(f"config arg teacher={a.teacher!r}; valid: {', '.join(TEACHER_NAMES)}.")
    c, s = _common(dataset)
    if a.teacher == "none" or a.mode == "scratch":  # a scratch student has no teacher
        a.teacher, a.mode = "none", "scratch"
    mode = a.mode
    c.experiment = "kd"
    if a.teacher != "none":
        c.teacher.model = s["teachers"][a.teacher]
        c.teacher.source = a.source
        if a.path:
            c.teacher.path = a.path
    c.teacher.precomputed = a.precomputed
    if a.store:
        c.teacher.store = a.store
    c.kd.mode = mode
    c.kd.reading = a.reading
    if mode == "eskd" and a.reading == "stop_kd":
        c.kd.stop_epoch = s["stop"]
    if mode == "eskd" and a.reading == "early_teacher":
        c.teacher.early_epoch = s["early"]
    sizes = [m for m in a.ta.split("+") if m]
    for m in sizes:
        if m not in s["teachers"]:
            raise ValueError(f"config arg ta={a.ta!r}: {m!r} is not a size; valid: "
                             f"{', '.join(s['teachers'])}.")
    c.assistants = tuple(s["teachers"][m] for m in sizes)
    c.name = f"{dataset}_eskd/{a.teacher}/{mode}" + (f"/{a.reading}" if mode == "eskd" else "")
    if sizes:
        c.name += "/ta=" + "+".join(sizes)
    if a.smoke:
        _smoke(c)
    return c.lock()


def fitnet_config(dataset: str, arg=None):
    """FitNet on ``dataset``: a trained CNN teacher, a thin-and-deep CNN student.
    ARG: ``source=train|checkpoint``, ``path=DIR``, ``smoke``."""
    a = base.parse_arg(arg, source="train", path="", smoke=False)
    c, s = _common(dataset)
    c.experiment = "fitnet"
    c.optimizer.lr = s["fitnet_lr"]
    c.student.model = s["fitnet_student"]
    c.teacher.model = s["fitnet_teacher"]
    c.teacher.source = a.source
    c.teacher.lr = s["lr"]  # the teacher trains like the ESKD teachers; the FitNet rate is the student's
    if a.path:
        c.teacher.path = a.path
    c.fitnet.hint_layer = s["fitnet_layer"]
    c.fitnet.guided_layer = s["fitnet_layer"]
    c.fitnet.stage1_epochs = s["stage1_epochs"]
    # Regressor, hint loss, tau and lambda: base.kd_config's FitNet defaults (the paper's).
    c.name = f"{dataset}_fitnet"
    if a.smoke:
        _smoke(c)
    return c.lock()
