"""Quantized checkpoints: packed integer weights + grids + the float rest, no pickled code.

A checkpoint directory holds
- ``packed_weights.safetensors``: per quantized layer ``<layer>.codes`` (uint8, codes bit-packed to
  their width, see packing.py), ``<layer>.scale`` and ``<layer>.zero_point`` (float32, shaped to
  broadcast against the weight);
- ``float_state.safetensors``: every other tensor of the model (biases, BN, unquantized weights and
  the activation quantizers' state: scale, zero point, signed flag, initialized, observer state);
- ``quant.json``: the QuantConfig, the quantization plan (incl. which layers share an input
  quantizer), the per-layer weight grids and activation quantizer parameters, the model metadata;
- ``manifest.json``: format name/version, zsq version, model name, sizes and sha256 of each file.

Loading rebuilds the architecture with ``zsq.models.load(model_name)`` (random init, no download; a
user's ``file.py:function`` is imported and called again, with the saved metadata),
re-applies ``quantize_model`` with the saved config and overwrites every tensor, so the loaded
model's outputs are bit-identical to the saved model's.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from zsq.errors import ZsqError
from zsq.models.factory import USER_MODULE_PREFIX
from zsq.export.frozen import FrozenWeightQuantizer
from zsq.export.manifest import (FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, file_entries, read_manifest,
                                 zsq_version)
from zsq.export.packing import pack_codes, unpack_codes
from zsq.export.weight_grid import weight_grid
from zsq.quant.state import set_flags
from zsq.quant.inventory import act_quantizers, quant_layers

PACKED_FILE = "packed_weights.safetensors"
STATE_FILE = "float_state.safetensors"
QUANT_FILE = "quant.json"
CHECKPOINT_FILES = (PACKED_FILE, STATE_FILE, QUANT_FILE)


# ---- what to save ------------------------------------------------------------------------------
def _named_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters and buffers, each shared tensor once (under its first name in module order)."""
    out = dict(model.named_parameters())
    out.update(dict(model.named_buffers()))
    return out


def _act_entry(name: str, q: nn.Module) -> dict:
    if hasattr(q, "initialized") and not bool(q.initialized) and not getattr(getattr(q, "spec", None),
                                                                             "dynamic", False):
        raise ZsqError(f"activation quantizer {name} was never initialised; calibrate the model "
                       f"(zsq.quant.calibrate / calibrate_from_bn) before saving it")
    scale = getattr(q, "scale", None)
    zp = getattr(q, "zero_point", None)
    return {"name": name, "type": type(q).__name__, "bits": int(getattr(q, "bits", 0)),
            "signed": bool(getattr(q, "signed", False)), "qmin": int(getattr(q, "qmin", 0)),
            "qmax": int(getattr(q, "qmax", 0)),
            "scale": scale.detach().reshape(-1).tolist() if scale is not None else None,
            "zero_point": zp.detach().reshape(-1).tolist() if zp is not None else None,
            "enabled": bool(getattr(q, "enabled", True))}


def _collect(qmodel: nn.Module) -> dict:
    config = getattr(qmodel, "zsq_quant_config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ZsqError("not a zsq quantized model (no zsq_quant_config); quantize it with "
                       "zsq.quant.quantize_model or a zsq method first")
    plan = getattr(qmodel, "zsq_quant_plan", {}) or {}
    packed: Dict[str, torch.Tensor] = {}
    layers: List[dict] = []
    skip_prefixes, skip_names = [], set()
    quant_weight_numel = 0
    for name, layer in quant_layers(qmodel):
        if layer.weight_quant is None:
            continue
        g = weight_grid(name, layer)
        packed[f"{name}.codes"] = pack_codes(g.codes, g.bits, g.qmin)
        packed[f"{name}.scale"] = g.scale.contiguous()
        packed[f"{name}.zero_point"] = g.zero_point.contiguous()
        dynamic = bool(getattr(getattr(layer.weight_quant, "spec", None), "dynamic", False))
        layers.append({"name": name, "type": type(layer).__name__, "shape": list(layer.weight.shape),
                       "numel": layer.weight.numel(), "bits": g.bits, "qmin": g.qmin, "qmax": g.qmax,
                       "weight_quant": g.quantizer, "dynamic": dynamic})
        skip_names.add(f"{name}.weight")
        skip_prefixes.append(f"{name}.weight_quant.")
        quant_weight_numel += layer.weight.numel()
    acts = [_act_entry(n, q) for n, q in act_quantizers(qmodel)]
    quantizer_tensors = {id(t) for _, q in act_quantizers(qmodel) for t in list(q.parameters()) + list(q.buffers())}
    state, fp_numel = {}, 0
    for k, t in _named_tensors(qmodel).items():
        if k in skip_names or any(k.startswith(p) for p in skip_prefixes):
            continue
        state[k] = t.detach().cpu().clone().contiguous()
        if t.is_floating_point() and id(t) not in quantizer_tensors:
            fp_numel += t.numel()
    meta = getattr(qmodel, "zsq_meta", None)
    quant = {
        "config": config.to_dict(),
        "plan": plan,
        "shared_input_quantizers": plan.get("shared_input_quantizers", []),
        "layers": layers,
        "act_quantizers": acts,
        "meta": meta.to_dict() if meta is not None and hasattr(meta, "to_dict") else None,
    }
    return {"packed": packed, "state": state, "quant": quant,
            "fp32_bytes": 4 * (quant_weight_numel + fp_numel)}


# ---- save --------------------------------------------------------------------------------------
_OBSERVER_BUFFERS = ("obs_min", "obs_max")  # +-inf until something is observed; not part of the grid


def _check_finite(parts: dict, info: Optional[dict]) -> None:
    """A checkpoint with NaN/inf weights or ranges (or a NaN in its report) is refused, not written."""
    from zsq.runstate import non_finite_paths

    bad = [k for group in ("packed", "state") for k, t in parts[group].items()
           if not k.endswith(_OBSERVER_BUFFERS) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    bad += ["info." + p.rstrip(".") for p in non_finite_paths(info or {})]
    if bad:
        raise ZsqError(f"the quantized model has NaN or inf values ({len(bad)} tensor(s)/value(s), e.g. {bad[0]}); "
                       "nothing was written")


def save_quantized(qmodel: nn.Module, out_dir, *, model_name: str, weights_path: Optional[str] = None,
                   info: Optional[dict] = None, force: bool = False) -> dict:
    """Write ``qmodel`` as a packed checkpoint into ``out_dir``; returns sizes and paths.

    Refuses a non-empty ``out_dir`` unless ``force`` (then only the checkpoint's own files are
    replaced; other content, e.g. a ``synth/`` folder, is left alone). Everything is computed and
    checked before the first byte is written, and files are written to a temporary folder and
    moved in at the end, so an error leaves ``out_dir`` as it was.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if not model_name or not isinstance(model_name, str):
        raise ZsqError("save_quantized needs model_name (the name zsq.models.load rebuilds the architecture from)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ZsqError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ZsqError(f"{out_dir} exists and is not empty (pass force=True / --force to overwrite)")
    try:
        json.dumps(info or {})
    except TypeError as e:
        raise ZsqError(f"info must be JSON-serialisable: {e}") from None
    was_training = qmodel.training
    qmodel.eval()
    try:
        parts = _collect(qmodel)
    finally:
        qmodel.train(was_training)
    _check_finite(parts, info)

    parent = out_dir.parent if out_dir.parent.exists() else None
    tmp = Path(tempfile.mkdtemp(prefix=".zsq-save-", dir=parent))
    try:
        save_file(parts["packed"], str(tmp / PACKED_FILE), metadata={"format": FORMAT_NAME})
        save_file(parts["state"], str(tmp / STATE_FILE), metadata={"format": FORMAT_NAME})
        (tmp / QUANT_FILE).write_text(json.dumps(parts["quant"], indent=1, default=str, allow_nan=False))
        files = file_entries(tmp, CHECKPOINT_FILES)
        weight_bytes = sum(t.numel() * t.element_size() for k, t in parts["packed"].items() if k.endswith(".codes"))
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "zsq_version": zsq_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model_name": model_name, "weights_path": str(weights_path) if weights_path else None,
            "preset": parts["quant"]["config"].get("preset"),
            "bits": f"w{parts['quant']['config'].get('w_bits')}a{parts['quant']['config'].get('a_bits')}",
            "fp32_bytes": parts["fp32_bytes"], "packed_weight_bytes": weight_bytes,
            "files": files, "info": info or {},
        }
        manifest["packed_bytes"] = sum(f["bytes"] for f in files.values())
        manifest["size_ratio"] = round(manifest["packed_bytes"] / max(parts["fp32_bytes"], 1), 4)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, allow_nan=False))
        out_dir.mkdir(parents=True, exist_ok=True)
        umask = os.umask(0)
        os.umask(umask)
        for name in CHECKPOINT_FILES + (MANIFEST_FILE,):  # safetensors writes 0600; use the usual mode
            os.chmod(tmp / name, 0o666 & ~umask)
        # manifest last: a reader never sees a new manifest with old files
        for name in CHECKPOINT_FILES + (MANIFEST_FILE,):
            shutil.move(str(tmp / name), str(out_dir / name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out_dir), "format_version": FORMAT_VERSION, "fp32_bytes": manifest["fp32_bytes"],
            "packed_bytes": manifest["packed_bytes"], "packed_weight_bytes": weight_bytes,
            "size_ratio": manifest["size_ratio"], "files": sorted(files)}


# ---- load --------------------------------------------------------------------------------------
def _build_model(model_name: str, model_factory: Optional[Callable[[str], nn.Module]]) -> nn.Module:
    if model_factory is not None:
        return model_factory(model_name)
    try:
        from zsq.models import load
    except ImportError as e:
        raise ZsqError(f"cannot rebuild {model_name!r}: zsq.models is unavailable ({e})") from None
    return load(model_name)


def _build_factory_model(model_name: str, saved_meta: Optional[dict]) -> nn.Module:
    """A user's file.py:function / module:function, called again, with the metadata the checkpoint saved."""
    from zsq.models import load
    from zsq.models.meta import ModelMeta

    with torch.random.fork_rng(devices=[]):  # its random init is overwritten; the caller's RNG is kept
        return load(model_name, meta=ModelMeta.from_dict(saved_meta) if saved_meta else None)


def _read_checkpoint(folder: Path):
    """(manifest, quant.json, packed weights, float state), the files checked against the manifest."""
    from safetensors.torch import load_file

    manifest = read_manifest(folder)
    for name in CHECKPOINT_FILES:
        if name not in manifest["files"]:
            raise ZsqError(f"checkpoint {folder}: manifest does not list {name}")
    try:
        quant = json.loads((folder / QUANT_FILE).read_text())
        packed = load_file(str(folder / PACKED_FILE))
        state = load_file(str(folder / STATE_FILE))
    except ZsqError:
        raise
    except Exception as e:  # hashes matched, so this is a writer bug or a hand-made manifest
        raise ZsqError(f"checkpoint {folder} cannot be read: {e.__class__.__name__}: {e}") from None
    return manifest, quant, packed, state


def _rebuild(folder: Path, model_name: str, quant: dict, model_factory):
    """The model quantized with the saved config, input quantizers shared exactly as saved."""
    from zsq.quant.qconfig import QuantConfig
    from zsq.quant.transforms import quantize_model

    from zsq.models.factory import is_factory_spec

    if model_factory is None and model_name.startswith(USER_MODULE_PREFIX):
        cls = model_name[len(USER_MODULE_PREFIX):]
        raise ZsqError(f"{folder} holds a model that was given to zsq as an nn.Module ({cls}), which zsq cannot "
                       f"rebuild by itself: load it with zsq.load_quantized(path, model_factory=lambda name: "
                       f"{cls}(...)), or quantize from a factory (path/to/file.py:function) so the checkpoint "
                       "records how to rebuild it")
    if model_factory is None and is_factory_spec(model_name):
        model = _build_factory_model(model_name, quant.get("meta"))
    else:
        model = _build_model(model_name, model_factory)
    if quant.get("meta") and getattr(model, "zsq_meta", None) is None:
        from zsq.models.meta import ModelMeta, set_meta

        set_meta(model, ModelMeta.from_dict(quant["meta"]))
    config = QuantConfig.from_dict(quant["config"])
    structure = (quant.get("plan") or {}).get("dfq_structure")
    if structure:  # DFQ folded BN, clipped ReLU6 per channel and added biases: the same modules again
        from zsq.quant.equalize import add_missing_biases, rebuild_structure

        rebuild_structure(model, structure)
    qmodel = quantize_model(model, config)
    if structure:
        add_missing_biases(qmodel, structure.get("biases", []))
    for sharer, owner in quant.get("shared_input_quantizers", []):
        try:
            qmodel.get_submodule(sharer).input_quant = qmodel.get_submodule(owner).input_quant
        except AttributeError:
            raise ZsqError(f"checkpoint {folder} does not fit {model_name}: no module {sharer} / {owner}") from None
    return qmodel, config


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_grid(where: str, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int) -> None:
    """A step must be a finite positive float, a zero point an integer on the grid [qmin, qmax]."""
    if not scale.is_floating_point() or not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ZsqError(f"{where}: scale is not finite and positive (the file is damaged or edited)")
    if (zp.shape != scale.shape or not zp.is_floating_point() or not bool(torch.isfinite(zp).all())
            or not torch.equal(zp, torch.round(zp)) or int(zp.min()) < qmin or int(zp.max()) > qmax):
        raise ZsqError(f"{where}: zero point is not an integer in the declared code range [{qmin}, {qmax}] "
                       "(the file is damaged or edited)")


def _declared_grid(folder: Path, e: dict, layer: nn.Module, packed: dict):
    """(codes, scale, zero point) of one layer, each checked against what quant.json declares for it (bits,
    code range, shape) and against the model's config: the hashes only prove the files are the ones the
    manifest names, and a manifest is as easy to rewrite as the files."""
    name = e["name"]
    where = f"checkpoint {folder}: layer {name}"
    bits, qmin, qmax, numel, shape = e.get("bits"), e.get("qmin"), e.get("qmax"), e.get("numel"), e["shape"]
    if not all(_is_int(v) for v in (bits, qmin, qmax, numel)) or not 1 <= bits <= 8 or not qmin < qmax \
            or qmax - qmin + 1 > 1 << bits:
        raise ZsqError(f"{where} declares an impossible grid (bits {bits!r}, codes [{qmin!r}, {qmax!r}])")
    want_bits = getattr(layer.weight_quant, "bits", None)
    if want_bits is not None and int(want_bits) != bits:
        raise ZsqError(f"{where} declares {bits}-bit weights, its quantization config {int(want_bits)}-bit")
    if numel != layer.weight.numel():
        raise ZsqError(f"{where} declares {numel!r} weights, its shape {shape} holds {layer.weight.numel()}")
    missing = [k for k in ("codes", "scale", "zero_point") if f"{name}.{k}" not in packed]
    if missing:
        raise ZsqError(f"{where}: {PACKED_FILE} holds no {name}.{missing[0]}")
    packed_codes, scale, zp = packed[f"{name}.codes"], packed[f"{name}.scale"], packed[f"{name}.zero_point"]
    if packed_codes.dtype != torch.uint8:
        raise ZsqError(f"{where}: packed codes are {packed_codes.dtype}, not uint8")
    try:
        fits = torch.broadcast_shapes(tuple(scale.shape), tuple(shape)) == tuple(shape) and scale.dim() <= len(shape)
    except RuntimeError:
        fits = False
    if not fits:
        raise ZsqError(f"{where}: scale of shape {list(scale.shape)} does not fit its weight of shape {shape}")
    _check_grid(where, scale, zp, qmin, qmax)
    codes = unpack_codes(packed_codes, bits, qmin, numel)
    if numel and (int(codes.min()) < qmin or int(codes.max()) > qmax):
        raise ZsqError(f"{where}: codes [{int(codes.min())}, {int(codes.max())}] leave the declared range "
                       f"[{qmin}, {qmax}] (the file is damaged or edited)")
    return codes.reshape(shape), scale, zp


def _check_act_ranges(folder: Path, qmodel: nn.Module, quant: dict) -> None:
    """Every activation quantizer loaded has the range it had when saved (save refuses an uncalibrated one):
    initialised, a finite positive step and an integer zero point on its grid, the bits quant.json declares."""
    declared = {a.get("name"): a for a in quant.get("act_quantizers", []) if isinstance(a, dict)}
    for name, q in act_quantizers(qmodel):
        if not hasattr(q, "initialized") or getattr(getattr(q, "spec", None), "dynamic", False):
            continue
        where = f"checkpoint {folder}: activation quantizer {name}"
        if not bool(q.initialized):
            raise ZsqError(f"{where} has no range (a saved model is always calibrated: the file is damaged or edited)")
        entry = declared.get(name)
        if entry is not None and entry.get("bits") != q.bits:
            raise ZsqError(f"{where} declares {entry.get('bits')!r} bits, its quantization config {q.bits}")
        _check_grid(where, q.scale.detach(), q.zero_point.detach(), q.qmin, q.qmax)


def _load_packed(qmodel: nn.Module, folder: Path, model_name: str, quant: dict, packed: dict) -> List[str]:
    """Weights from their packed codes with frozen grids; the tensor names this covers (prefixes end in '.')."""
    layers = dict(quant_layers(qmodel))
    saved_names = [e["name"] for e in quant["layers"]]
    unknown = [n for n in saved_names if n not in layers]
    if unknown:
        raise ZsqError(f"checkpoint {folder} does not fit {model_name}: no layer {unknown[0]}")
    covered = []
    for e in quant["layers"]:
        name, layer = e["name"], layers[e["name"]]
        if list(layer.weight.shape) != e["shape"]:
            raise ZsqError(f"checkpoint {folder}: layer {name} has shape {e['shape']}, the model {list(layer.weight.shape)}")
        codes, scale, zp = _declared_grid(folder, e, layer, packed)
        deq = (codes.to(scale.dtype) - zp) * scale
        with torch.no_grad():
            layer.weight.copy_(deq)
        layer.weight_quant = FrozenWeightQuantizer(scale, zp, e["bits"], e["qmin"], e["qmax"])
        if not torch.equal(layer.quantized_weight().detach(), deq):
            raise ZsqError(f"layer {name}: stored grid does not reproduce its weights (checkpoint {folder})")
        covered += [f"{name}.weight", f"{name}.weight_quant."]
    # layers saved without a weight quantizer keep theirs off
    for name, layer in layers.items():
        if name not in saved_names:
            layer.weight_quant = None
    return covered


def _load_state(qmodel: nn.Module, folder: Path, what: str, state: dict, covered: List[str]) -> None:
    """Every other parameter and buffer from the float state; names must match exactly."""
    skip_names = {c for c in covered if not c.endswith(".")}
    skip_prefixes = [c for c in covered if c.endswith(".")]
    targets = {k: t for k, t in _named_tensors(qmodel).items()
               if k not in skip_names and not any(k.startswith(p) for p in skip_prefixes)}
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ZsqError(f"checkpoint {folder} does not fit {what}: {detail}")
    with torch.no_grad():
        for k, t in targets.items():
            src = state[k]
            if src.shape != t.shape:
                raise ZsqError(f"checkpoint {folder}: {k} has shape {list(src.shape)}, the model {list(t.shape)}")
            if src.is_floating_point() and not k.endswith(_OBSERVER_BUFFERS) and not bool(torch.isfinite(src).all()):
                raise ZsqError(f"checkpoint {folder}: {k} holds NaN or inf (a saved model never does: the file is "
                               "damaged or edited)")
            t.copy_(src.to(t.dtype))


def load_quantized(path, *, model_factory: Optional[Callable[[str], nn.Module]] = None) -> nn.Module:
    """Rebuild the fake-quant model saved by ``save_quantized`` (CPU, eval mode).

    ``model_factory(model_name) -> nn.Module`` replaces ``zsq.models.load`` (for custom models).
    """
    folder = Path(path)
    manifest, quant, packed, state = _read_checkpoint(folder)
    model_name = manifest["model_name"]
    qmodel, config = _rebuild(folder, model_name, quant, model_factory)
    if manifest.get("bits") not in (None, config.bits):
        raise ZsqError(f"checkpoint {folder}: the manifest says {manifest.get('bits')!r}, its quant.json {config.bits!r} "
                       "(the files are damaged or edited)")
    covered = _load_packed(qmodel, folder, model_name, quant, packed)
    _load_state(qmodel, folder, f"{model_name} quantized with {config.describe()}", state, covered)
    _check_act_ranges(folder, qmodel, quant)
    saved_acts = {a["name"]: a for a in quant.get("act_quantizers", [])}
    for name, q in act_quantizers(qmodel):
        set_flags([q], observing=False, enabled=saved_acts.get(name, {}).get("enabled", True))
    qmodel.zsq_quant_plan = quant.get("plan", {})
    qmodel.zsq_quant_config = config
    qmodel.zsq_checkpoint = {k: manifest[k] for k in ("model_name", "format_version", "zsq_version", "bits",
                                                       "preset", "packed_bytes", "fp32_bytes")
                             if k in manifest}
    qmodel.zsq_checkpoint["path"] = str(folder)
    return qmodel.eval()
