"""``python -m experiments.reproduce_cpu``: the command of :mod:`experiments.reproduce_cpu`."""

from experiments.reproduce_cpu import main

if __name__ == "__main__":  # not in the spawned worker processes, which import this module too
    raise SystemExit(main())
