"""Test certificates made with the ``openssl`` command (the ``cryptography`` package is not a
dependency): a CA and a certificate it signs for 127.0.0.1/localhost, usable as server and client."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pki:
    ca: str     # the CA's certificate (PEM file)
    cert: str   # a certificate it signed for 127.0.0.1 and localhost
    key: str


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(root: Path, name: str) -> Pki:
    """A fresh CA named ``name`` and one certificate it signed, under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    ca, ca_key = root / f"{name}-ca.pem", root / f"{name}-ca.key"
    cert, key, csr = root / f"{name}.pem", root / f"{name}.key", root / f"{name}.csr"
    ext = root / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-x509", *_EC, "-days", "1", "-subj", f"/CN={name} test CA", "-keyout", str(ca_key),
             "-out", str(ca))
    _openssl("req", "-new", *_EC, "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(csr))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-days", "1",
             "-set_serial", str(secrets.randbits(63)), "-extfile", str(ext), "-out", str(cert))
    return Pki(str(ca), str(cert), str(key))
