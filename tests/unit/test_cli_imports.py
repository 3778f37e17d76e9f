"""The `stagemesh` command starts where only the runtime dependencies are installed (the image):
building its parser and `--help` import nothing from the test extras (httpx, transformers,
openai) nor the optional UCX package. Every benchmark's heavy imports stay inside its run."""

from __future__ import annotations

import subprocess
import sys

BLOCKED = ["httpx", "transformers", "openai", "ucxx", "pytest"]

SCRIPT = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None   # `import name` now raises ImportError
from stagemesh.cli.main import build_parser
parser = build_parser()
for argv in (["bench", "gateway", "--help"], ["bench", "soak", "--help"], ["bench", "decode", "--help"],
             ["bench", "chaos", "--help"], ["up", "--help"], ["stage", "--help"]):
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        assert e.code == 0, argv
print("ok")
"""


def test_cli_parser_needs_no_test_extras() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
