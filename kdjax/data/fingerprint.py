"""The identity of a train transform: a fingerprint of its code and parameters.

A view-keyed logit store holds a teacher's outputs on the views ``transform(record,
example_rng(seed, epoch, id))``; :func:`transform_fingerprint` names the transform in the store's
metadata so that a run with another augmentation is refused instead of reading soft targets of
other views. The fingerprint is ``'<description>@<sha256, 16 hex digits>'``: the description is
readable (the function's qualified name and its bound parameters), the digest covers

* the source text of the function (its bytecode where there is no source), its defaults, the
  values its closure captures and the arguments a ``functools.partial`` binds;
* for a callable object, its class's ``__call__`` and the object's attributes;
* recursively, every function or class it names as a global that is defined in the same package
  (or in ``kdjax``), e.g. ``random_resized_crop_box`` under ``imagenet_train_transform``;
* NumPy arrays by dtype, shape and bytes.

So any edit of that code, and any other parameter, changes the fingerprint (conservatively: a
comment too). Library code outside the package (NumPy, PIL) is not hashed. A transform may fix its
own identity with a ``kdjax_fingerprint`` string attribute (e.g. a version), which is used as is.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import types
from typing import Any

import numpy as np

_MAX_DEPTH = 12


def _package(module: str | None) -> str:
    return (module or "").split(".")[0]


def _code_text(fn: types.FunctionType) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):  # no source file (exec, some notebooks): the bytecode and constants
        code = fn.__code__
        return f"{code.co_code.hex()}|{code.co_names}|{_consts(code)}"


def _consts(code: types.CodeType) -> str:
    return repr([_consts(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts])


def _global_names(code: types.CodeType) -> list[str]:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_global_names(const))
    return names


class _Hasher:
    def __init__(self):
        self.parts: list[str] = []
        self.seen: set[int] = set()

    def value(self, x: Any, home: str, depth: int) -> str:
        """Readable text of a parameter value; code it refers to goes into ``parts``."""
        if depth > _MAX_DEPTH:
            return "..."
        if x is None or isinstance(x, (bool, int, float, complex, str, bytes)):
            return repr(x)
        if isinstance(x, np.generic):
            return f"{type(x).__name__}({x!r})"
        if isinstance(x, np.ndarray):
            digest = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16]
            return f"ndarray{list(x.shape)}{x.dtype}#{digest}"
        if isinstance(x, (tuple, list)):
            inner = ", ".join(self.value(v, home, depth + 1) for v in x)
            return f"({inner})" if isinstance(x, tuple) else f"[{inner}]"
        if isinstance(x, (set, frozenset)):  # sorted: a set's order varies with the hash seed
            return "{" + ", ".join(sorted(self.value(v, home, depth + 1) for v in x)) + "}"
        if isinstance(x, dict):
            return "{" + ", ".join(f"{self.value(k, home, depth + 1)}: {self.value(v, home, depth + 1)}"
                                   for k, v in sorted(x.items(), key=lambda kv: repr(kv[0]))) + "}"
        if isinstance(x, types.ModuleType):
            return f"module {x.__name__}"
        if callable(x):
            return self.callable(x, home, depth + 1)
        text = repr(x)
        if " at 0x" in text:  # a default repr says nothing stable: the type and attributes instead
            attrs = getattr(x, "__dict__", {})
            return f"{type(x).__qualname__}({self.value(dict(attrs), home, depth + 1)})"
        return text

    def function(self, fn: types.FunctionType, home: str, depth: int) -> str:
        name = f"{fn.__module__}.{fn.__qualname__}"
        if id(fn) in self.seen:
            return name
        self.seen.add(id(fn))
        self.parts.append(f"code {name}:\n{_code_text(fn)}")
        if fn.__defaults__:
            self.parts.append(f"defaults {name}: {self.value(fn.__defaults__, home, depth)}")
        if fn.__kwdefaults__:
            self.parts.append(f"kwdefaults {name}: {self.value(fn.__kwdefaults__, home, depth)}")
        for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                content = "<empty>"
            self.parts.append(f"closure {name}.{var}: {self.value(content, home, depth)}")
        for gname in sorted(set(_global_names(fn.__code__))):
            target = fn.__globals__.get(gname)
            if isinstance(target, (types.FunctionType, type)) and (
                    _package(getattr(target, "__module__", None)) in (home, "kdjax")):
                self.callable(target, home, depth + 1)
        return name

    def callable(self, fn: Any, home: str, depth: int) -> str:
        if depth > _MAX_DEPTH:
            return "..."
        own = getattr(fn, "kdjax_fingerprint", None)
        if isinstance(own, str) and own:
            return own
        if isinstance(fn, functools.partial):
            args = [self.value(a, home, depth) for a in fn.args]
            args += [f"{k}={self.value(v, home, depth)}" for k, v in sorted(fn.keywords.items())]
            return f"partial({self.callable(fn.func, home, depth + 1)}{''.join(', ' + a for a in args)})"
        if isinstance(fn, types.MethodType):
            return f"{self.value(fn.__self__, home, depth)}.{self.callable(fn.__func__, home, depth + 1)}"
        if isinstance(fn, types.FunctionType):
            return self.function(fn, home, depth)
        if isinstance(fn, type):
            name = f"{fn.__module__}.{fn.__qualname__}"
            if id(fn) not in self.seen:
                self.seen.add(id(fn))
                for attr, member in sorted(vars(fn).items()):
                    if isinstance(member, (types.FunctionType, staticmethod, classmethod)):
                        func = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
                        self.function(func, home, depth + 1)
            return name
        if isinstance(fn, types.BuiltinFunctionType):
            return f"{getattr(fn, '__module__', None)}.{fn.__qualname__}"
        # A callable object: its class's code and its attributes.
        cls_name = self.callable(type(fn), home, depth + 1)
        attrs = self.value(dict(getattr(fn, "__dict__", {})), home, depth + 1)
        return f"{cls_name}({attrs})"


def transform_fingerprint(transform: Any) -> str:
    """``'<description>@<16 hex digits>'``: the identity of a train transform (see the module doc);
    ``'identity'`` for ``None`` (the pipeline's pass-through)."""
    if transform is None:
        return "identity"
    if not callable(transform):
        raise TypeError(f"transform must be a callable transform(record, rng) or None, got "
                        f"{type(transform).__name__}")
    inner = transform
    while isinstance(inner, functools.partial):
        inner = inner.func
    home = _package(getattr(inner, "__module__", None) or type(inner).__module__)
    hasher = _Hasher()
    description = hasher.callable(transform, home, 0)
    digest = hashlib.sha256("\n".join([description, *hasher.parts]).encode()).hexdigest()[:16]
    return f"{description}@{digest}"


__all__ = ["transform_fingerprint"]
