"""The checkpoint manifest: what a directory must contain to be trusted as a zsq checkpoint.

manifest.json names the format and its version, the zsq version that wrote it, and the size and
sha256 of every other file, so a truncated download or an edited file is caught before any tensor
is read.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Dict

from zsq.errors import ZsqError

FORMAT_NAME = "zsq-quantized-checkpoint"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"


def zsq_version() -> str:
    """The library version (from the installed metadata, else pyproject.toml next to the package)."""
    try:
        from importlib.metadata import version

        return version("zsq")
    except Exception:  # not pip-installed: read the source tree's pyproject
        pass
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        m = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M)
        return m.group(1) if m else "unknown"
    except OSError:
        return "unknown"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entries(folder: Path, names) -> Dict[str, dict]:
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names}


def read_manifest(folder: Path, verify: bool = True) -> dict:
    """The manifest of a checkpoint dir, after checking format, version and every file's hash."""
    folder = Path(folder)
    if not folder.exists():
        raise ZsqError(f"checkpoint {folder} does not exist")
    if not folder.is_dir():
        raise ZsqError(f"{folder} is not a zsq checkpoint (expected a directory with {MANIFEST_FILE})")
    mpath = folder / MANIFEST_FILE
    if not mpath.exists():
        raise ZsqError(f"{folder} is not a zsq checkpoint (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZsqError(f"{mpath} is not valid JSON ({e.__class__.__name__}); the checkpoint is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ZsqError(f"{folder} is not a zsq checkpoint ({MANIFEST_FILE} does not name format {FORMAT_NAME!r})")
    ver = manifest.get("format_version")
    if not isinstance(ver, int) or ver < 1:
        raise ZsqError(f"{mpath}: bad format_version {ver!r}")
    if ver > FORMAT_VERSION:
        raise ZsqError(f"{folder} uses checkpoint format version {ver}, newer than this zsq "
                       f"({zsq_version()}) reads (<= {FORMAT_VERSION}); upgrade zsq")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ZsqError(f"{mpath} lists no files; the checkpoint is damaged")
    if verify:
        for name, entry in files.items():
            p = folder / name
            if not p.is_file():
                raise ZsqError(f"checkpoint {folder} is missing file {name}")
            size = p.stat().st_size
            if size != entry.get("bytes"):
                raise ZsqError(f"checkpoint file {p} has {size} bytes, the manifest says {entry.get('bytes')} "
                               f"(truncated or modified)")
            if sha256_file(p) != entry.get("sha256"):
                raise ZsqError(f"checkpoint file {p} does not match its sha256 in the manifest (modified or corrupt)")
    return manifest
