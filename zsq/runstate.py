"""Run state on disk, one way for synthesis, PTQ and QAT: resume files, fingerprints, JSON.

A state file is one safetensors file: the tensors, plus the rest of the state (ints, floats,
strings, nesting) as a JSON skeleton in the safetensors header, and a sha256 of both. Nothing is
unpickled, so a run folder from anywhere can be read without running code; a truncated or edited
file is a one-line ZsqError naming it. Every write goes to a temp file renamed into place, so a
kill leaves the previous state or the new one, never half of one.

A fingerprint is a JSON dict of everything that decides the result (tensors by their sha256);
``check_same_run`` refuses a resume whose fingerprint differs and names each difference.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import stat
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from zsq.errors import ZsqError

logger = logging.getLogger(__name__)

FORMAT = "zsq-runstate/1"
_TAGS = ("__tensor__", "__tuple__", "__items__", "__float__")


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 (16 hex) of a tensor's dtype, shape and bytes: how fingerprints name tensors."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def source_digest(root=None) -> str:
    """sha256 (16 hex) of the Python sources under ``root`` (default: the zsq package): which code made a
    result (a results file resumed by other code would otherwise mix rows of two versions silently)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def fingerprint(**parts: Any) -> Dict[str, Any]:
    """A JSON-normal dict of ``parts`` with every tensor replaced by its digest."""

    def norm(v):
        if torch.is_tensor(v):
            return f"tensor:{tensor_digest(v)}"
        if isinstance(v, dict):
            return {str(k): norm(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return v

    return json.loads(json.dumps(norm(parts), sort_keys=True, default=str))


def differences(old: Any, new: Any, prefix: str = "") -> List[str]:
    """``key (checkpoint: a, now: b)`` for every leaf where two fingerprints differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: List[str] = []
        for k in sorted(set(old) | set(new)):
            out += differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.') or 'value'} (checkpoint: {old!r}, now: {new!r})"]


def check_same_run(where, old: dict, new: dict) -> None:
    """ZsqError naming what differs when the saved fingerprint ``old`` is not this run's ``new``."""
    diffs = sorted(differences(old, new), key=lambda d: d.split(" (", 1)[0].count("."))  # top-level first
    if diffs:
        more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
        raise ZsqError(f"cannot resume from {where}: it was made with a different run: "
                       + "; ".join(diffs[:6]) + more + " (use another --out, or --force to start over)")


# ---- state files ---------------------------------------------------------------------------------
def _encode(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(obj):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"run state cannot hold a {type(obj).__name__}")


def _decode(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _digest(skeleton: str, tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(skeleton.encode())
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensor_digest(tensors[k]).encode())
    return h.hexdigest()


def save_state(path, obj: Any) -> Path:
    """Write ``obj`` (nested dicts/lists/tuples of tensors and JSON values) to ``path`` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: Dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_encode(obj, tensors), sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "state": skeleton,
                                           "sha256": _digest(skeleton, tensors)})
    os.replace(tmp, path)
    return path


def load_state(path) -> Any:
    """What save_state wrote; a one-line ZsqError naming the file when it is damaged or foreign."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated/garbled headers
        raise ZsqError(f"{path} is damaged or not a zsq run-state file ({_first_line(e)}); "
                       "remove it to start that part over") from None
    if meta.get("format") != FORMAT or "state" not in meta:
        raise ZsqError(f"{path} is not a zsq run-state file (format {meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("sha256") != _digest(meta["state"], tensors):
        raise ZsqError(f"{path} was changed after zsq wrote it (checksum mismatch); remove it to start that part over")
    try:
        return _decode(json.loads(meta["state"]), tensors)
    except (ValueError, KeyError, TypeError) as e:
        raise ZsqError(f"{path} is damaged ({_first_line(e)})") from None


def restore(module_or_optimizer, state, path) -> None:
    """``load_state_dict`` whose failure (a state that does not fit) names the file, in one line."""
    try:
        module_or_optimizer.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise ZsqError(f"{path} does not fit this run ({_first_line(e)}); remove it to start over") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


# ---- JSON ------------------------------------------------------------------------------------------
def non_finite_paths(obj: Any, prefix: str = "") -> List[str]:
    """Keys (dotted) of every NaN/inf float or non-finite tensor inside ``obj``."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [prefix or "value"]
    if torch.is_tensor(obj):
        return [] if not obj.is_floating_point() or bool(torch.isfinite(obj).all()) else [prefix or "value"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in non_finite_paths(v, f"{prefix}{k}.")] if obj else []
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in non_finite_paths(v, f"{prefix}{i}.")]
    return []


def to_json(obj: Any, **kw) -> str:
    """json.dumps that refuses NaN/inf (naming the keys) instead of writing invalid JSON."""
    bad = [p.rstrip(".") for p in non_finite_paths(obj)]
    if bad:
        raise ZsqError(f"result has non-finite values ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}); "
                       "refusing to write it")
    return json.dumps(obj, allow_nan=False, **kw)


def write_json(path, obj: Any, **kw) -> Path:
    """Atomic, always-valid JSON file."""
    path = Path(path)
    text = to_json(obj, **kw)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def read_json(path) -> Any:
    """A JSON file zsq wrote; a one-line ZsqError naming it when it is truncated or garbled."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ZsqError(f"{path} is damaged (not valid JSON: {_first_line(e)})") from None
    except OSError as e:
        raise ZsqError(f"cannot read {path}: {e.strerror or _first_line(e)}") from None


# ---- run folders -----------------------------------------------------------------------------------
RUN_FILE = ".zsq-run.json"
RUN_FORMAT = "zsq-run/2"


def identity(p: Path, files: bool = True) -> Optional[dict]:
    """What identifies an entry zsq created, without following links: a regular file by its size, inode and
    mtime (a file edited, replaced or copied over no longer matches); a directory by its device and inode,
    plus (``files``) the same for every regular file zsq wrote in it. None when nothing is there."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return None
    if stat.S_ISREG(st.st_mode):
        return {"type": "file", "size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns}
    if stat.S_ISDIR(st.st_mode):
        return {"type": "dir", "dev": st.st_dev, "ino": st.st_ino, "files": {}}
    return {"type": "other"}


def _same(a: Optional[dict], b: Optional[dict]) -> bool:
    """Two identities name the same entry (a directory's file list is not part of its identity)."""
    if not a or not b or a.get("type") != b.get("type") or a["type"] == "other":
        return False
    keys = ("dev", "ino") if a["type"] == "dir" else ("size", "ino", "mtime_ns")
    return all(a.get(k) == b.get(k) for k in keys)


def _walk_files(d: Path):
    """(relative path, Path) of every entry below ``d`` that is not a directory, links not followed."""
    for root, dirs, names in os.walk(d, followlinks=False):
        for n in names + [x for x in dirs if os.path.islink(os.path.join(root, x))]:
            f = Path(root) / n
            yield f.relative_to(d).as_posix(), f


def is_zsq_state_file(p: Path) -> bool:
    """A file zsq's own writers made (a run-state safetensors with zsq's format, or a run JSON with its
    fingerprint): what --force may remove in a zsq folder when a killed run had no time to record it."""
    try:
        if not stat.S_ISREG(os.lstat(p).st_mode):
            return False
        with open(p, "rb") as f:
            head = f.read(8)
            if p.suffix == ".safetensors" and len(head) == 8:
                n = int.from_bytes(head, "little")
                if n > 10_000_000:
                    return False
                meta = json.loads(f.read(n).decode()).get("__metadata__") or {}
                return meta.get("format") == FORMAT
        if p.suffix == ".json" and p.stat().st_size < 10_000_000:
            obj = json.loads(p.read_text())
            return isinstance(obj, dict) and "fingerprint" in obj
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return False
    return False


class RunFolder:
    """What zsq owns in an output folder, listed in OUT/.zsq-run.json with the identity of each entry
    (``identity``), the fingerprint of the command that made them, and whether that run finished.

    An entry is recorded only once zsq has created it. ``--force`` removes an entry only while it still
    matches what was recorded (a file replaced, edited or planted under the same name is kept) and
    never one that is an input of the command; in a directory zsq made it removes only the files zsq
    recorded there (or, after a killed run, zsq's own state files written since that run began) and
    keeps the directory when anything else is in it. A name zsq needs that exists but is not zsq's is
    refused, not overwritten. One command at a time holds the folder (zsq.runlock). ``--resume``
    continues only a run made by the same command."""

    def __init__(self, out, names, dirs=(), lock=None):
        """``lock``: what holds the folder for this run (zsq.runlock.RunLock(out), given by the caller: a
        leaf module does not import another); None: no lock."""
        self.out, self.names, self.dirs = Path(out), tuple(names), tuple(dirs)
        self.path = self.out / RUN_FILE
        self.lock = lock
        self.started_ns = 0

    def record(self) -> dict:
        """The run record ({} when there is none); an older record without identities owns nothing."""
        if not (self.path.exists() or self.path.is_symlink()):
            return {}
        if not self.path.is_file() or self.path.is_symlink():
            raise ZsqError(f"{self.path} is not a regular file; remove it to use {self.out}")
        rec = read_json(self.path)
        # every record zsq ever wrote names its fingerprint: a file without one is the user's, and zsq
        # would write its record over it
        if not isinstance(rec, dict) or not isinstance(rec.get("entries", {}), dict) or "fingerprint" not in rec:
            raise ZsqError(f"{self.path} is damaged (not a zsq run record); remove it to use {self.out}")
        if rec.get("format") != RUN_FORMAT:  # no identities: zsq cannot tell its own entries from the user's
            rec = dict(rec, entries={})
        return rec

    def owned(self, rec: dict, name: str) -> bool:
        return _same(rec.get("entries", {}).get(name), identity(self.out / name))

    def begin(self, fp: dict, *, resume: bool, force: bool, inputs=()) -> None:
        """Lock the folder, check it against the command, clear an earlier run on --force, create the
        run's directories and record them. Refusals leave the folder as it was."""
        if self.out.exists() and not self.out.is_dir():
            raise ZsqError(f"--out {self.out} exists and is not a directory")
        made_out = not self.out.exists()
        ensure_writable_dir(self.out)
        try:
            if self.lock is not None:
                self.lock.acquire()
            self._begin(fp, resume=resume, force=force, inputs=inputs)
        except BaseException:
            self.release()
            if made_out:
                try:
                    self.out.rmdir()
                except OSError:
                    pass
            raise

    def _begin(self, fp: dict, *, resume: bool, force: bool, inputs) -> None:
        rec = self.record()
        lock_name = self.lock.path.name if self.lock is not None else None
        used = any(p.name != lock_name for p in self.out.iterdir())
        if resume:
            if used and not rec:
                raise ZsqError(f"--resume: {self.out} holds no zsq run to continue (no {RUN_FILE})")
            if rec.get("fingerprint") is not None:
                check_same_run(self.out, rec["fingerprint"], fp)
        elif used and not force:
            raise ZsqError(f"--out {self.out} exists and is not empty (use --force to overwrite, --resume to continue)")
        for name in self.names:
            p = self.out / name
            if (p.exists() or p.is_symlink()) and not self.owned(rec, name):
                raise ZsqError(f"{p} exists and was not made by zsq (or was changed since); it needs that name "
                               "for its run (move it, or use another --out)")
        entries = {k: v for k, v in rec.get("entries", {}).items() if self.owned(rec, k)}
        if force and not resume:
            self._check_replaced_files(entries)
            entries = self._clear(dict(rec, entries=entries), [Path(p).resolve() for p in inputs if p])
        for d in self.dirs:
            p = self.out / d
            if not (p.exists() or p.is_symlink()):
                p.mkdir()
                entries[d] = identity(p)
        self._write(entries, fp, bool(rec.get("finished")) and resume, rec.get("started_ns"))
        # what zsq writes from now on is newer than the record: what refresh() claims; a --force after a
        # killed run goes by the first start (zsq's own state files written since then are zsq's)
        self.started_ns = os.lstat(self.path).st_ctime_ns
        if not (resume and rec.get("started_ns")):
            self._write(entries, fp, bool(rec.get("finished")) and resume, self.started_ns)

    def _check_replaced_files(self, entries: dict) -> None:
        """In zsq's folders, a file zsq wrote that was replaced or edited since keeps zsq's name: the new run
        would write the same name again, over the user's bytes. Refused, as a top-level name is."""
        for name, ident in entries.items():
            if ident.get("type") != "dir":
                continue
            files = ident.get("files", {})
            for rel, f in _walk_files(self.out / name):
                if rel in files and not _same(files[rel], identity(f)):
                    raise ZsqError(f"{f} was changed since zsq wrote it (or replaced by another file); the run "
                                   "needs that name (move it, or use another --out)")

    def _write(self, entries: dict, fp, finished: bool, started_ns) -> None:
        write_json(self.path, {"format": RUN_FORMAT, "entries": entries, "fingerprint": fp,
                               "finished": finished, "started_ns": started_ns}, indent=1, sort_keys=True)

    def refresh(self) -> None:
        """Record what this run has created since begin(): the run's names that were absent then (begin
        refused any that existed and were not zsq's) and the files in zsq's directories written since."""
        rec = self.record()
        entries = dict(rec.get("entries", {}))
        for name in self.names:
            p = self.out / name
            ident = identity(p)
            if ident is None or ident["type"] == "other":
                entries.pop(name, None)
                continue
            if not _same(entries.get(name), ident):
                if os.lstat(p).st_ctime_ns < self.started_ns:
                    entries.pop(name, None)  # not written by this run: not zsq's
                    continue
                entries[name] = ident
            if ident["type"] == "dir":
                files = entries[name].get("files", {})
                now = {}
                for rel, f in _walk_files(p):
                    fi = identity(f)
                    if fi and fi["type"] == "file" and (_same(files.get(rel), fi)
                                                        or os.lstat(f).st_ctime_ns >= self.started_ns):
                        now[rel] = fi
                entries[name] = dict(entries[name], files=now)
        self._write(entries, rec.get("fingerprint"), bool(rec.get("finished")), rec.get("started_ns"))

    def finish(self) -> None:
        """Record what the run made, drop its empty directories, mark it finished and let the folder go."""
        self.refresh()
        rec = self.record()
        entries = dict(rec.get("entries", {}))
        for name in list(entries):
            p = self.out / name
            if entries[name].get("type") == "dir" and self.owned(rec, name) and not any(p.iterdir()):
                p.rmdir()
                del entries[name]
        self._write(entries, rec.get("fingerprint"), True, rec.get("started_ns"))
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _clear(self, rec: dict, inputs: List[Path]) -> dict:
        """Remove what the record owns (identities already matched), except inputs; the entries kept."""
        out = self.out.resolve()
        kept = {}
        for name, ident in rec.get("entries", {}).items():
            p = self.out / name
            if name in (RUN_FILE,) or "/" in name or name in ("", ".", ".."):
                continue
            target = out / name if p.is_symlink() else p.resolve()
            if any(i == target or target in i.parents or i in target.parents for i in inputs):
                continue  # an input of this command: kept, and no longer zsq's to remove
            if ident["type"] == "file":
                p.unlink()
            elif ident["type"] == "dir":
                left = self._clear_dir(p, ident, int(rec.get("started_ns") or 0))
                if left:
                    logger.warning(f"--force kept {p}: it holds {len(left)} entries zsq did not write "
                                   f"({', '.join(left[:3])}{' ...' if len(left) > 3 else ''})")
                    kept[name] = dict(ident, files={})
        return kept

    @staticmethod
    def _clear_dir(d: Path, ident: dict, started_ns: int) -> List[str]:
        """Remove from the directory ``d`` the files zsq recorded (still matching) and zsq's own state files
        newer than the killed run's start; then the empty directories. What is left, by relative path."""
        files, left = ident.get("files", {}), []
        for rel, f in list(_walk_files(d)):
            ours = _same(files.get(rel), identity(f)) or (
                rel not in files and is_zsq_state_file(f) and os.lstat(f).st_ctime_ns >= started_ns > 0)
            if ours:
                f.unlink()
            else:
                left.append(rel)
        for root, dirs, _ in sorted(os.walk(d, followlinks=False), key=lambda t: -len(t[0])):
            for x in dirs:
                q = Path(root) / x
                if not q.is_symlink():
                    try:
                        q.rmdir()
                    except OSError:
                        pass
        if not left:
            d.rmdir()
        return left


def check_writable_dir(d) -> Path:
    """Refuse, before any work, a directory that cannot be made or written (nothing is created)."""
    d = Path(d)
    if d.exists() and not d.is_dir():
        raise ZsqError(f"{d} exists and is not a directory")
    anc = d
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ZsqError(f"cannot create {d}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ZsqError(f"cannot write to {d}: {anc} is not writable")
    return d


def ensure_writable_dir(d) -> Path:
    """Create ``d`` (and parents) and prove it is writable, before any long work: one-line errors."""
    d = check_writable_dir(d)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".zsq-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ZsqError(f"cannot write to {d}: {e.strerror or _first_line(e)}") from None
    return d


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_output_file(path, *, force: bool, inputs=(), option: str = "--out", replaceable=None) -> Path:
    """Refuse, before any work, a named output file zsq must not write: one that is an input of the same
    command (or inside one), anything but a regular file (a device, a FIFO, a link, a directory), an
    existing file without ``force``, or with ``force`` one that ``replaceable(path)`` says zsq could not
    have written; and a parent that cannot be written. Nothing is created."""
    path = Path(path)
    real = Path(os.path.realpath(path))
    for i in inputs:
        if not i:
            continue
        ip = Path(os.path.realpath(str(i).split("[", 1)[0]))
        same = path.exists() and Path(ip).exists() and not path.is_dir() and os.path.samefile(path, ip)
        if _inside(real, ip) or same:
            raise ZsqError(f"{option} {path} is an input of this command ({i}); write the output elsewhere")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ZsqError(f"{option} {path}: {e.strerror or _first_line(e)}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise ZsqError(f"{option} {path} is a directory; give a file name, e.g. {path / 'model.onnx'}")
        if not stat.S_ISREG(st.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file (a device, FIFO or socket)"
            raise ZsqError(f"{option} {path} is {kind}; zsq replaces only regular files it wrote")
        if not force:
            raise ZsqError(f"{path} exists (use --force to overwrite)")
        if replaceable is not None and not replaceable(path):
            raise ZsqError(f"{option} {path} exists and is not a file zsq writes; refusing to replace it "
                           "even with --force (move it, or name another file)")
    check_writable_dir(path.parent if str(path.parent) else Path("."))
    return path
