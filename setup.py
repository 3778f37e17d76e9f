"""Build hook: the gRPC modules (stagekit/rpc/pb/*_pb2*.py) are generated from protos/ while
the distribution is built, by scripts/gen_protos.py (the same generator `make protos` runs).

- wheel (`pip install .`, `python -m build`): into the build directory, next to the copied
  sources, with the .proto files alongside;
- editable (`pip install -e .`): into the source tree, where the editable install imports from.

Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

from setuptools import Command, setup
from setuptools.command.build import build

ROOT = Path(__file__).resolve().parent


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class build_protos(Command):  # lower case, like the setuptools commands
    """Generate the protobuf/gRPC modules (a sub-command of `build`, run after build_py)."""

    description = "generate stagekit/rpc/pb/*_pb2*.py from protos/"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        self.build_lib: str | None = None
        self.editable_mode = False

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def _out(self) -> Path:
        return ROOT if self.editable_mode else Path(self.build_lib)

    def run(self) -> None:
        gen = _generator()
        out = self._out()
        for src in gen.generate(ROOT, out):
            print(f"generated {src.relative_to(ROOT / 'protos')} -> {out}")
        if not self.editable_mode:  # the wheel carries the .proto sources too
            for rel in gen.proto_sources(ROOT):
                shutil.copyfile(ROOT / "protos" / rel, out / rel)

    def get_outputs(self) -> list[str]:
        gen = _generator()
        files = gen.generated_files(ROOT) + ([] if self.editable_mode else gen.proto_sources(ROOT))
        return [str(Path(self.build_lib) / rel) for rel in files]

    def get_output_mapping(self) -> dict[str, str]:
        # editable installs in `strict` mode link these build outputs to the files in the source tree
        if not self.editable_mode:
            return {}
        return {str(Path(self.build_lib) / rel): str(ROOT / rel) for rel in _generator().generated_files(ROOT)}

    def get_source_files(self) -> list[str]:
        return [str(Path("protos") / rel) for rel in _generator().proto_sources(ROOT)]


class build_with_protos(build):
    sub_commands = [*build.sub_commands, ("build_protos", None)]


setup(cmdclass={"build": build_with_protos, "build_protos": build_protos})
