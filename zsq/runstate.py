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
import math
import os
from pathlib import Path
from typing import Any, Dict, List

import torch

from zsq.errors import ZsqError

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


class RunFolder:
    """What zsq owns in an output folder: the entries it created (listed in OUT/.zsq-run.json), the
    fingerprint of the command that made them, and whether that run finished.

    ``--force`` removes only listed entries, never one that is an input of the command; a name zsq
    needs that exists but is not listed (the user's own ``work/``) is refused, not overwritten.
    ``--resume`` continues only a run made by the same command."""

    def __init__(self, out, names):
        self.out, self.names = Path(out), tuple(names)
        self.path = self.out / RUN_FILE

    def record(self) -> dict:
        if not self.path.exists():
            return {}
        rec = read_json(self.path)
        if not isinstance(rec, dict) or not isinstance(rec.get("created", []), list):
            raise ZsqError(f"{self.path} is damaged (not a zsq run record); remove it to use {self.out}")
        return rec

    def begin(self, fp: dict, *, resume: bool, force: bool, inputs=()) -> None:
        """Check the folder against the command, clear an earlier run on --force, record what zsq will create."""
        if self.out.exists() and not self.out.is_dir():
            raise ZsqError(f"--out {self.out} exists and is not a directory")
        rec = self.record()
        used = self.out.is_dir() and any(self.out.iterdir())
        if resume:
            if used and not rec:
                raise ZsqError(f"--resume: {self.out} holds no zsq run to continue (no {RUN_FILE})")
            if rec.get("fingerprint") is not None:
                check_same_run(self.out, rec["fingerprint"], fp)
        elif used and not force:
            raise ZsqError(f"--out {self.out} exists and is not empty (use --force to overwrite, --resume to continue)")
        for name in self.names:
            p = self.out / name
            if (p.exists() or p.is_symlink()) and name not in rec.get("created", []):
                raise ZsqError(f"{p} exists and was not made by zsq; it needs that name for its run state "
                               "(move it, or use another --out)")
        if force and not resume:
            self._clear(rec, [Path(p).resolve() for p in inputs])
            rec = self.record()
        created = set(rec.get("created", [])) | set(self.names)
        ensure_writable_dir(self.out)
        write_json(self.path, {"created": sorted(created | {RUN_FILE}), "fingerprint": fp,
                               "finished": bool(rec.get("finished")) and resume}, indent=1, sort_keys=True)

    def finish(self) -> None:
        rec = self.record()
        rec["finished"] = True
        write_json(self.path, rec, indent=1, sort_keys=True)

    def _clear(self, rec: dict, inputs: List[Path]) -> None:
        import shutil

        out = self.out.resolve()
        kept = []
        for name in rec.get("created", []):
            p = self.out / name
            if name == RUN_FILE or not (p.exists() or p.is_symlink()):
                continue
            target = (out / name).resolve() if not p.is_symlink() else out / name
            if "/" in name or ".." in name or target.parent != out:
                raise ZsqError(f"{self.path} lists {name!r}, which is not an entry of {self.out}; refusing to remove it")
            if any(i == target or target in i.parents for i in inputs):
                kept.append(name)  # an input of this command: kept, and no longer zsq's to remove
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        if not self.path.exists():
            return
        write_json(self.path, dict(rec, created=[n for n in rec.get("created", []) if n not in kept
                                                 and ((self.out / n).exists() or n == RUN_FILE)],
                                   finished=False), indent=1, sort_keys=True)


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
