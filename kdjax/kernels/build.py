"""Builds kdjax's oneDNN convolution for the installed jaxlib: ``python -m kdjax.kernels.build``.

Compiles ``onednn_conv.cc`` with the C++ compiler (``$CXX``, default ``g++``, with ``-fopenmp``)
against the jaxlib's XLA FFI headers (``jax.ffi.include_dir()``) and the system oneDNN (``-ldnnl``;
Debian/Ubuntu package ``libdnnl-dev``; ``$DNNL_ROOT`` points at another install with ``include/``
and ``lib/``). The result, :func:`kdjax.kernels.onednn.library_path`, is rebuilt only when missing or
older than the source (``--force`` rebuilds). Exits non-zero with the compiler's message when the build fails.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import subprocess
import sys

import jax

from kdjax.kernels import onednn


def compile_command(out: pathlib.Path) -> list[str]:
    """The compiler invocation that builds ``out`` from :data:`onednn.SOURCE`."""
    cmd = [os.environ.get("CXX", "g++"), "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
           "-isystem", jax.ffi.include_dir(), str(onednn.SOURCE), "-o", str(out)]
    root = os.environ.get("DNNL_ROOT")
    if root:
        cmd += ["-isystem", f"{root}/include", f"-L{root}/lib", f"-Wl,-rpath,{root}/lib"]
    return cmd + ["-ldnnl"]


def build(force: bool = False) -> pathlib.Path:
    """Compiles the library if needed and returns its path; ``RuntimeError`` if the compiler fails."""
    out = onednn.library_path()
    if not force and out.exists() and out.stat().st_mtime >= onednn.SOURCE.stat().st_mtime:
        return out
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    cmd = compile_command(tmp)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"building kdjax's oneDNN convolution failed:\n  {shlex.join(cmd)}\n{proc.stderr.strip()}\n"
            f"It needs a C++17 compiler and oneDNN (Debian/Ubuntu: `apt-get install g++ libdnnl-dev`).")
    os.replace(tmp, out)  # atomic: a concurrent importer never loads a half-written library
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    try:
        path = build(force=args.force)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
