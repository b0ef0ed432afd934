"""The ``>>>`` examples in the docstrings of kdjax.losses, run with doctest.

Every public loss (``kdjax.losses.__all__``) must carry at least one example, and every example in its
module must pass. The printed numbers are rounded Python floats, so they read the same on every jax
version; tests/test_losses.py checks the losses themselves against float64 references.
"""
import doctest
import importlib

import pytest

from kdjax import losses

OPTIONS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
PUBLIC_BY_MODULE = {}
for _name in losses.__all__:
    PUBLIC_BY_MODULE.setdefault(getattr(losses, _name).__module__, []).append(_name)


def test_every_public_loss_is_in_a_checked_module():
    assert sum(len(names) for names in PUBLIC_BY_MODULE.values()) == len(losses.__all__) == 15
    assert sorted(PUBLIC_BY_MODULE) == [f"kdjax.losses.{m}" for m in
                                        ("boxes", "features", "logits", "reductions", "topk")]


@pytest.mark.parametrize("module_name", sorted(PUBLIC_BY_MODULE))
def test_docstring_examples_pass(module_name):
    module = importlib.import_module(module_name)
    public = PUBLIC_BY_MODULE[module_name]
    tests = doctest.DocTestFinder().find(module)
    found = {test.name.rsplit(".", 1)[-1]: len(test.examples) for test in tests}
    missing = [name for name in public if found.get(name, 0) == 0]
    assert not missing, f"public losses without a >>> example in {module_name}: {missing}"
    result = doctest.testmod(module, optionflags=OPTIONS)  # failures are printed to the captured stdout
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {module_name} failed"
    assert result.attempted >= len(public)
