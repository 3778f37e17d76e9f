"""The package as users install it, not as the test suite imports it from the checkout.

A wheel is built from a copy of the source (tracked and untracked-but-not-ignored files, so
nothing generated in the checkout leaks in) and installed into a fresh virtualenv; an editable
install goes into another one from another copy. Both must import the gRPC modules that the
build hook (setup.py -> scripts/gen_protos.py) generates, and the wheel's `stagemesh` console
script must serve a completion with `stagemesh up`.

Cheap by default: the build runs without isolation on this interpreter (its setuptools and
grpcio-tools, no network) and the venvs reach this interpreter's installed dependencies
through a .pth file (site directories named there are put on sys.path but their own .pth
files are not run, so this venv's editable install of the checkout stays out). The real
user path (build isolation, dependencies from the index, torch from constraints.txt) is
test_fresh_venv_full_install: slow and needs network to PyPI, so it runs only with
STAGEMESH_TEST_FULL_INSTALL=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from stagekit.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
PB_MODULES = ("common_pb2", "common_pb2_grpc", "stage_pb2", "stage_pb2_grpc", "generation_pb2",
              "generation_pb2_grpc")


def _env(tmp: Path) -> dict[str, str]:
    """Nothing from the checkout: no PYTHONPATH (tests/conftest.py sets one), caches in tmp."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(XDG_CACHE_HOME=str(tmp / "cache"), PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _run(cmd: list[str], tmp: Path, timeout: float = 300) -> str:
    # cwd=tmp: `python -m ...` puts the working directory first on sys.path, never the checkout
    r = subprocess.run(cmd, cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _source_copy(dst: Path) -> Path:
    """The files of the checkout a clone (plus uncommitted work) would have, copied to dst."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files are source")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():  # deleted but not yet committed files are still listed
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def _venv_with_our_deps(path: Path) -> Path:
    """A venv without pip whose sys.path ends with this interpreter's site-packages; returns its python."""
    venv.EnvBuilder(with_pip=False, clear=True).create(path)
    py = path / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True, env=_env(path)).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    Path(purelib, "_stagemesh_test_deps.pth").write_text("".join(f"{p}\n" for p in ours))
    return py


def _pip(tmp: Path, py: Path, *args: str) -> str:
    """This interpreter's pip, installing into the venv of py (pip --python: the venv needs no pip)."""
    return _run([sys.executable, "-m", "pip", "--python", str(py), *args], tmp)


def _imports_generated_modules(py: Path, tmp: Path, under: Path) -> None:
    code = ("import importlib, json; print(json.dumps([importlib.import_module('stagekit.rpc.pb.' + m).__file__ "
            f"for m in {PB_MODULES!r}]))")
    files = json.loads(_run([str(py), "-c", code], tmp))
    assert all(Path(f).resolve().is_relative_to(under.resolve()) for f in files), files


def _descendants(pid: int) -> list[int]:
    rows = [line.split() for line in subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True,
                                                    text=True).stdout.splitlines() if line.strip()]
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {int(p) for p, pp in rows if int(pp) in frontier and int(p) not in found}
        found |= frontier
    return sorted(found)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM makes `up` stop its mesh; whatever survives (by pid) is killed."""
    children = _descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _serve_one_completion(bin_dir: Path, tmp: Path) -> None:
    """`stagemesh demo-model DIR`, then `stagemesh up --model DIR` on a free port and one completion."""
    model = tmp / "demo-model"
    _run([str(bin_dir / "stagemesh"), "demo-model", str(model)], tmp)
    assert (model / "config.json").is_file()
    port = free_port()
    log = tmp / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(bin_dir / "stagemesh"), "up", "--model", str(model), "--port", str(port), "--no-grpc",
             "--threads", "1", "--transport", "grpc", "--log-dir", str(tmp / "logs")],
            cwd=tmp, env=_env(tmp), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while "stagemesh is up" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:
            name = json.load(r)["data"][0]["id"]
        body = json.dumps({"model": name, "prompt": "Hello, mesh", "max_tokens": 4, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            completion = json.load(r)
        assert completion["usage"]["completion_tokens"] == 4, completion
        assert completion["choices"][0]["text"], completion
    finally:
        _stop(proc)
    assert proc.returncode == 0, log.read_text(errors="replace")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
          str(src)], tmp)
    (whl,) = (tmp / "dist").glob("stagemesh-*.whl")
    return whl


def test_wheel_ships_generated_modules_protos_and_kernel_sources(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    pb = {n.rsplit("/", 1)[1] for n in names if n.startswith("stagekit/rpc/pb/")}
    protos = {p.name for p in (ROOT / "protos" / "stagekit" / "rpc" / "pb").glob("*.proto")}
    assert protos, "no .proto sources found"
    expected = {"__init__.py"} | protos | {p.removesuffix(".proto") + s for p in protos
                                          for s in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")}
    assert pb == expected
    kernels = {p.name for p in (ROOT / "stagekit" / "kernels").glob("*.c")}
    assert kernels and {f"stagekit/kernels/{k}" for k in kernels} <= names
    assert not any(n.startswith(("tests/", "scripts/", "protos/")) for n in names)


def test_wheel_installs_and_serves(wheel: Path, tmp_path: Path) -> None:
    py = _venv_with_our_deps(tmp_path / "venv")
    _pip(tmp_path, py, "install", "--no-deps", str(wheel))
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path).strip())
    _imports_generated_modules(py, tmp_path, under=site)
    _serve_one_completion(py.parent, tmp_path)


def test_editable_install_generates_into_its_source_tree(tmp_path: Path) -> None:
    src = _source_copy(tmp_path / "src")
    assert not list((src / "stagekit" / "rpc" / "pb").glob("*_pb2*"))
    py = _venv_with_our_deps(tmp_path / "venv")
    _pip(tmp_path, py, "install", "--no-deps", "--no-build-isolation", "-e", str(src))
    _imports_generated_modules(py, tmp_path, under=src)
    assert "demo-model" in _run([str(py.parent / "stagemesh"), "--help"], tmp_path)


def test_build_requirement_matches_runtime_floors(wheel: Path) -> None:
    """The generated code refuses a grpcio older than the grpcio-tools that wrote it and a protobuf older
    than its protoc, so pyproject.toml pins grpcio-tools in [build-system] to the runtime floors."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (pin,) = [r.split("==")[1] for r in project["build-system"]["requires"] if r.startswith("grpcio-tools==")]
    floors = dict(r.split(">=") for r in project["project"]["dependencies"] if ">=" in r)
    assert floors["grpcio"] == pin
    if metadata.version("grpcio-tools") != pin:
        pytest.skip(f"the test wheel was generated by grpcio-tools {metadata.version('grpcio-tools')}, not {pin}")
    zf = zipfile.ZipFile(wheel)
    grpc_gen = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", zf.read("stagekit/rpc/pb/stage_pb2_grpc.py").decode())
    pb_gen = re.search(r"Protobuf Python Version: ([\d.]+)", zf.read("stagekit/rpc/pb/stage_pb2.py").decode())
    assert grpc_gen and pb_gen

    def v(s: str) -> tuple[int, ...]:
        return tuple(int(x) for x in s.split("."))

    assert v(grpc_gen[1]) <= v(floors["grpcio"])
    assert v(pb_gen[1]) <= v(floors["protobuf"])


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("STAGEMESH_TEST_FULL_INSTALL") != "1",
                    reason="needs PyPI and a few minutes: set STAGEMESH_TEST_FULL_INSTALL=1")
def test_fresh_venv_full_install(tmp_path: Path) -> None:
    """What a user runs: a venv with pip, torch from constraints.txt, then `pip install .` (build isolation:
    setuptools and the pinned grpcio-tools come from the index) with all dependencies."""
    src = _source_copy(tmp_path / "src")
    venv.EnvBuilder(with_pip=True, clear=True).create(tmp_path / "venv")
    bin_dir = tmp_path / "venv" / "bin"
    constraints = str(src / "constraints.txt")
    torch = next(line for line in (src / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))
    _run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "-c", constraints, torch], tmp_path, timeout=900)
    _run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "-c", constraints, str(src)], tmp_path, timeout=900)
    site = Path(_run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     tmp_path).strip())
    _imports_generated_modules(bin_dir / "python", tmp_path, under=site)
    _serve_one_completion(bin_dir, tmp_path)
