"""Builds kdjax's oneDNN convolution for the installed jaxlib and oneDNN, once, into a per-user cache.

:func:`build` compiles ``onednn_conv.cc`` with the C++ compiler (``$CXX``, default ``g++``, with
``-fopenmp``) against the jaxlib's XLA FFI headers (``jax.ffi.include_dir()``) and a oneDNN found
by :func:`find_onednn`, in this order:

1. ``$DNNL_ROOT``: an install with ``include/`` and ``lib/`` (a source build, conda, Debian's ``/usr``);
2. the PyPI wheels of kdjax's ``cpu`` extra (``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp``: the
   library in ``<prefix>/lib``, the headers in ``<prefix>/include``);
3. a system oneDNN in the compiler's default paths (Debian/Ubuntu ``libdnnl-dev``).

The library lands in :func:`cache_dir` (``$KDJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/kdjax``, else
``~/.cache/kdjax``) under a name keyed by the source, the jaxlib version, the oneDNN found and the
compiler command, so a change to any of them builds a new one and builds for different venvs never
collide. A file lock serialises the build between processes (pytest-xdist workers, the hosts of a
pod sharing a home directory): the first compiles, printing one line, the others wait and load its
result; the compiler's output is renamed into place, so no one ever loads a half-written library.

``kdjax.kernels.onednn`` calls :func:`build` on first use; ``python -m kdjax.kernels.build``
builds ahead of time (``--force`` rebuilds) and says which oneDNN it used.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import filelock
import jax

SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
#: The PyPI distributions of the ``cpu`` extra: oneDNN's library, and its headers.
WHEELS = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")
INSTALL_HINT = ("install kdjax's cpu extra (`pip install -e '.[cpu]'`: oneDNN from PyPI, x86-64 Linux) "
                "or point DNNL_ROOT at a oneDNN install with include/ and lib/")


_DEFAULT_INCLUDES = ("/usr/include", "/usr/local/include")


class BuildError(RuntimeError):
    """The kernel cannot be built here; the message says why and how to fix it."""


@dataclasses.dataclass(frozen=True)
class OneDnn:
    """A oneDNN install: its header and library directories (``None``: the compiler's defaults),
    its version (from ``dnnl_version.h``) and where it was found (for messages)."""
    include: pathlib.Path | None
    lib: pathlib.Path | None
    version: str
    origin: str


def _version(include: pathlib.Path) -> str:
    for header in (include / "oneapi" / "dnnl" / "dnnl_version.h", include / "dnnl_version.h"):
        if header.exists():
            fields = dict(re.findall(r"#define DNNL_VERSION_(MAJOR|MINOR|PATCH) (\d+)", header.read_text()))
            return ".".join(fields.get(k, "?") for k in ("MAJOR", "MINOR", "PATCH"))
    raise BuildError(f"no oneDNN headers in {include} (dnnl_version.h is missing): {INSTALL_HINT}.")


def _wheel_file(distribution: str, suffix: str) -> pathlib.Path | None:
    """The installed file of ``distribution`` whose absolute path ends with ``suffix`` (wheels
    record these data files relative to site-packages: ``../../../include/...``)."""
    try:
        files = importlib.metadata.distribution(distribution).files or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    paths = (pathlib.Path(os.path.normpath(f.locate())) for f in files)
    return next((p for p in paths if p.as_posix().endswith(suffix) and p.exists()), None)


def find_onednn() -> OneDnn:
    """The oneDNN to build against (module docstring's order); :class:`BuildError` if none."""
    root = os.environ.get("DNNL_ROOT")
    if root:
        root_path = pathlib.Path(root)
        return OneDnn(root_path / "include", root_path / "lib", _version(root_path / "include"),
                      f"DNNL_ROOT={root}")
    header = _wheel_file(WHEELS[1], "include/oneapi/dnnl/dnnl.hpp")
    library = _wheel_file(WHEELS[0], "lib/libdnnl.so")
    if header is not None and library is not None:
        include = header.parents[2]
        return OneDnn(include, library.parent, _version(include), f"PyPI {WHEELS[0]}")
    for include in map(pathlib.Path, _DEFAULT_INCLUDES):
        try:
            return OneDnn(None, None, _version(include), f"system ({include})")
        except BuildError:
            continue
    raise BuildError(f"no oneDNN found: {INSTALL_HINT}.")


def cache_dir() -> pathlib.Path:
    """Where built kernels live (module docstring)."""
    if os.environ.get("KDJAX_CACHE_DIR"):
        return pathlib.Path(os.environ["KDJAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "kdjax"


def compile_command(out: pathlib.Path, dnnl: OneDnn) -> list[str]:
    """The compiler invocation that builds ``out`` from :data:`SOURCE` against ``dnnl``."""
    cmd = [os.environ.get("CXX", "g++"), "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
           "-isystem", jax.ffi.include_dir()]
    if dnnl.include is not None and str(dnnl.include) not in _DEFAULT_INCLUDES:
        cmd += ["-isystem", str(dnnl.include)]  # (the defaults must stay last: #include_next)
    cmd += [str(SOURCE), "-o", str(out)]
    if dnnl.lib is not None:
        cmd += [f"-L{dnnl.lib}", f"-Wl,-rpath,{dnnl.lib}"]
    return cmd + ["-ldnnl"]


def library_path(dnnl: OneDnn | None = None) -> pathlib.Path:
    """The cached library for this source, jaxlib, oneDNN (default :func:`find_onednn`) and
    compiler command (it need not exist yet)."""
    import jaxlib
    dnnl = dnnl or find_onednn()
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), repr(dnnl).encode(),
                 shlex.join(compile_command(pathlib.Path("out.so"), dnnl)).encode()):
        key.update(hashlib.sha256(part).digest())
    return cache_dir() / f"onednn_conv-jaxlib{jaxlib.__version__}-onednn{dnnl.version}-{key.hexdigest()[:12]}.so"


def build(force: bool = False) -> pathlib.Path:
    """The library's path, compiled first unless cached (``force``: always); :class:`BuildError`
    naming the cause and the fix when there is no Linux, compiler or oneDNN, the cache is not
    writable, or the compiler fails."""
    if not sys.platform.startswith("linux"):
        raise BuildError(f"kdjax's oneDNN convolution is built on Linux only (this is {sys.platform}).")
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise BuildError(f"no C++ compiler: {compiler!r} (from $CXX, default g++) is not on PATH; "
                         f"install g++ (Debian/Ubuntu: `apt-get install g++`) or set CXX to one.")
    dnnl = find_onednn()
    out = library_path(dnnl)
    if out.exists() and not force:
        return out
    lock = filelock.FileLock(str(out) + ".lock")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as e:
        raise BuildError(f"cannot write kdjax's kernel cache {out.parent} ({e.strerror or e}): set "
                         f"KDJAX_CACHE_DIR to a writable directory.") from None
    try:
        if force or not out.exists():  # else another process built it while this one waited
            _compile(out, dnnl)
    finally:
        lock.release()
    return out


def _compile(out: pathlib.Path, dnnl: OneDnn) -> None:
    import jaxlib
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    cmd = compile_command(tmp, dnnl)
    print(f"kdjax: compiling the oneDNN convolution for jaxlib {jaxlib.__version__} and oneDNN "
          f"{dnnl.version} ({dnnl.origin}) into {out} (once; a few seconds)", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        errors = "\n".join(proc.stderr.strip().splitlines()[:20])
        raise BuildError(f"building kdjax's oneDNN convolution failed:\n  {shlex.join(cmd)}\n{errors}\n"
                         f"It needs a C++17 compiler with OpenMP and oneDNN's headers: {INSTALL_HINT}.")
    os.replace(tmp, out)  # atomic: a concurrent loader never sees a half-written library


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    try:
        path = build(force=args.force)
    except BuildError as e:
        print(e, file=sys.stderr)
        return 1
    dnnl = find_onednn()
    print(f"built {path} (oneDNN {dnnl.version}, {dnnl.origin})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
