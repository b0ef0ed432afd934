"""The command line of the entry points: flags, config overrides, exit statuses.

Entry points call :func:`parse_command_line` (``--config=FILE[:ARG] [--config.key=value ...]
--workdir=DIR [--distributed]``), :func:`initialize`, their experiment function, then
:func:`finish` (the report), all inside :func:`run_main`, which prints a
:class:`~experiments.errors.ConfigError` as one line and exits 2. What a run prints goes through
:func:`experiments.console.log`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import ml_collections

from experiments.console import log
from experiments.errors import ConfigError

if TYPE_CHECKING:
    from experiments.stages import RunOutcome


@dataclasses.dataclass
class Args:
    """A parsed command line: the locked config, ``--workdir`` and the entry point's own flags."""
    config: ml_collections.ConfigDict
    workdir: str | None
    distributed: bool
    flags: dict[str, Any]


def _check_override_key(config: ml_collections.ConfigDict, key: str) -> None:
    """Raises ConfigError unless ``config.<key>`` exists (``key`` is dotted, e.g. ``kd.mode``)."""
    node, path = config, []
    for part in key.split("."):
        where = "config" + "".join(f".{p}" for p in path)
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key}: {where} is a value ({node!r}), not a group of keys; "
                              f"override {where} itself.")
        if part not in node:
            raise ConfigError(f"--config.{key}: unknown config key {part!r} in {where}; valid keys "
                              f"there: {', '.join(sorted(node.keys()))}.")
        node = node[part]
        path.append(part)


def _override_keys(argv: Sequence[str]) -> list[str]:
    keys = []
    for arg in argv:
        for prefix in ("--config.", "--noconfig."):
            if arg.startswith(prefix):
                keys.append(arg[len(prefix):].split("=", 1)[0])
    return keys


def _load_config_file(argv: Sequence[str], prog: str) -> ml_collections.ConfigDict:
    from absl import flags
    from ml_collections import config_flags

    values = [a for a in argv if a.startswith("--config=")]
    if not values:
        raise ConfigError(f"{prog}: --config=FILE[:ARG] is required, e.g. "
                          f"--config=experiments/configs/mnist1d_eskd.py:teacher=large,mode=eskd.")
    path = values[-1][len("--config="):].split(":", 1)[0]
    if not os.path.isfile(path):
        raise ConfigError(f"{prog}: --config={path}: no such config file; the configs are in "
                          f"experiments/configs/ (e.g. --config=experiments/configs/mnist1d_eskd.py"
                          f":teacher=large,mode=eskd).")
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "experiment config", flag_values=fv,
                                    lock_config=True, sys_argv=[prog, values[-1]])
    try:
        fv([prog, values[-1]])
    except flags.Error as e:  # ml_collections prefixes the config's own error with its traceback
        raise ConfigError(f"{prog}: {str(e).strip().splitlines()[-1]}") from None
    return fv.config


def parse_command_line(argv: Sequence[str], *, prog: str, doc: str = "",
                       needs_workdir: bool = True,
                       extra_flags: Sequence[tuple[str, Any, str]] = ()) -> Args:
    """Parses ``--config=FILE[:ARG] [--config.key=value ...] --workdir=DIR [--distributed]``.

    ``argv`` excludes the program name. ``extra_flags``: ``(name, default, help)`` with a str,
    bool or int default (the flag's type). ``--help`` prints ``doc`` and the flags, then exits 0.
    Config overrides are checked against the loaded config first, so an unknown key fails with
    the list of valid keys, and ``--workdir`` by :func:`check_workdir`. Raises
    :class:`ConfigError` on any problem.
    """
    from absl import flags
    from ml_collections import config_flags

    argv = list(argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "experiment config file[:arg]", flag_values=fv,
                                    lock_config=True, sys_argv=[prog] + argv)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, report); reusing "
                        "it resumes", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (multi-host "
                      "TPU pods)", flag_values=fv)
    for name, default, help_text in extra_flags:
        if isinstance(default, bool):
            flags.DEFINE_bool(name, default, help_text, flag_values=fv)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_text, flag_values=fv)
        else:
            flags.DEFINE_string(name, default, help_text, flag_values=fv)
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv):
        print(doc.strip() + "\n\nflags:\n" + fv.get_help())
        raise SystemExit(0)
    base = _load_config_file(argv, prog)
    for key in _override_keys(argv):
        _check_override_key(base, key)
    try:
        rest = fv([prog] + argv)
    except flags.Error as e:
        raise ConfigError(f"{prog}: {e}") from None
    if len(rest) > 1:
        raise ConfigError(f"{prog}: unexpected positional arguments {rest[1:]}; every option is a "
                          f"--flag=value.")
    if needs_workdir and not fv.workdir:
        raise ConfigError(f"{prog}: --workdir=DIR is required (checkpoints, metrics and the report "
                          f"go there; rerunning with the same --workdir resumes).")
    if fv.workdir:
        check_workdir(prog, fv.workdir)
    extra = {name: fv[name].value for name, _, _ in extra_flags}
    return Args(config=fv.config, workdir=fv.workdir, distributed=fv.distributed, flags=extra)


def check_workdir(prog: str, workdir: str) -> None:
    """ConfigError (one line, naming the path and the fix) unless ``workdir`` is a writable
    directory or can be created as one: not a file, not under a file, not on a read-only file
    system or without permission. Leaves nothing behind."""
    path = os.path.abspath(workdir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    fix = "pass --workdir= a writable directory (created if missing)"
    if not os.path.isdir(path):
        where = "is a file" if path == os.path.abspath(workdir) else f"is under the file {path}"
        raise ConfigError(f"{prog}: --workdir={workdir} {where}, not a directory; {fix}.")
    try:  # a directory created and removed at once: the only sure test of writing there
        os.rmdir(tempfile.mkdtemp(prefix=".kdjax_write_check_", dir=path))
    except OSError as e:
        raise ConfigError(f"{prog}: --workdir={workdir}: cannot write in {path} ({e.strerror}); "
                          f"{fix}.") from None


def run_main(main: Callable[[Sequence[str]], int]) -> None:
    """``sys.exit(main(sys.argv[1:]))``, printing a ConfigError as one line (exit status 2)."""
    try:
        status = main(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(status)


def finish(config: ml_collections.ConfigDict, outcome: RunOutcome) -> int:
    """Writes the report of a finished run (process 0) and returns the exit status (0).

    A preempted run writes nothing more: the next start resumes it.
    """
    if outcome.stopped_early:
        log(f"stopped early (preemption); rerun the same command to resume {outcome.workdir}.")
        return 0
    if jax.process_index() == 0:
        from experiments import report

        path = report.write_report(outcome.workdir, title=config.name or config.experiment,
                                   summaries=outcome.summaries, paper_source=config.paper.source)
        log(f"report: {path}")
    return 0


def initialize(args: Args) -> None:
    """Multi-host set-up (``--distributed``: ``jax.distributed.initialize()``, before any JAX work)."""
    if args.distributed:
        jax.distributed.initialize()
