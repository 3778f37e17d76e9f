"""Compile a C kernel shipped with stagekit into a shared library, once per machine.

The library is built with the system C compiler (``cc``, override with ``CC``) for the
CPU it runs on (``-march=native``) and cached under ``$STAGEMESH_KERNEL_CACHE`` (default
``~/.cache/stagemesh/kernels``), keyed by the source, the flags and the CPU, so processes
that start together build it once and every later process just loads it. OpenMP comes
from the runtime torch already loaded (same soname), so the kernel's threads are torch's.
Without a compiler, or when the build fails, ``load`` returns None and callers use their
torch fallback; ``STAGEMESH_NATIVE_KERNELS=0`` forces that.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loads torch's OpenMP runtime before any kernel library)

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def _cache_dir() -> Path:
    root = os.environ.get("STAGEMESH_KERNEL_CACHE") or Path.home() / ".cache" / "stagemesh" / "kernels"
    return Path(root)


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.M)


def _source_bytes(src: Path, seen: frozenset[Path] = frozenset()) -> bytes:
    """The source followed by every sibling file it #includes "quoted" (recursively), so the
    cache key changes when a shared kernel a source compiles in changes."""
    data = src.read_bytes()
    out = [data]
    for inc in _INCLUDE.findall(data):
        dep = src.parent / inc.decode()
        if dep.is_file() and dep not in seen:
            out.append(_source_bytes(dep, seen | {src}))
    return b"".join(out)


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The library built from ``stagekit/kernels/<name>.c``, or None where it cannot be built."""
    if os.environ.get("STAGEMESH_NATIVE_KERNELS", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler: native kernel %s unavailable, using the torch fallback", name)
        return None
    src = Path(__file__).with_name(f"{name}.c")
    key = hashlib.sha256(_source_bytes(src) + " ".join([cc, *FLAGS]).encode() + _cpu_id().encode()).hexdigest()[:16]
    out = _cache_dir() / f"{name}-{key}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                part = Path(tmp) / out.name
                subprocess.run([cc, *FLAGS, f"-I{src.parent}", str(src), "-o", str(part), "-lm"], check=True,
                               capture_output=True, text=True, timeout=120)
                os.replace(part, out)  # atomic: a process starting beside us sees all or nothing
            log.info("built native kernel %s (%s)", name, out)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            log.warning("native kernel %s did not build, using the torch fallback: %s", name, detail.strip()[-500:])
            return None
    try:
        return ctypes.CDLL(str(out))
    except OSError as e:
        log.warning("native kernel %s did not load, using the torch fallback: %s", name, e)
        return None
