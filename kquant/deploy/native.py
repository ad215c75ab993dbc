"""The native deploy file (``.npz``, format ``kquant-deploy`` version 2).

One uncompressed NumPy archive. ``manifest`` (UTF-8 JSON bytes) holds the
format name and version, the *inference* model config (kernel quantizers
removed, folded batch norms replaced by ``Identity``), one entry per stored
tensor, and the SHA-256 of every other array. Arrays are named
``<path>:<part>`` with ``<path>`` the structural path of :mod:`.paths`:

* quantized kernel (``kind: "quantized"``): ``codes`` (uint8, level indices
  packed at the quantizer's bitwidth, ``ceil(n·bits/8)`` bytes), ``levels``
  (float32 ``[C, 2^bits]``: the exact value of each code per channel, ``C = 1``
  per tensor, else the size of ``channel_axis``), ``param:<name>`` (the
  quantizer's floats, e.g. BWN's scale; checked against ``levels`` on load);
* ALQ layer (``kind: "alq"``, ALQ Eq. 26): ``mask`` (G·I_max bits, the
  per-group bitwidth table), ``bases`` (n bits per active basis),
  ``coordinates`` (float32 α per active basis);
* every other variable (``kind: "float"``): ``value``.

``levels`` are read from the training forward pass itself, so the decoded
kernel is bit-identical to the one the training model uses in inference mode.
Under mixed precision they are the quantizer's float32 levels, before the cast
to the layer's compute dtype: the deployed layer applies the same cast (its
autocast) where the trained layer did, and reads the kernel in float32 where
the quantizer kept float32 (more bits than the compute dtype holds; see
:mod:`kquant.quantizers.base`), so it runs the same operations in the same
dtypes (a 16-bit kernel under ``mixed_bfloat16`` stays float32, as in training).
Loading validates everything and raises :class:`DeployFormatError` naming the
array; a file is never loaded into a silently different model.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile

import keras
import numpy as np
from keras import ops

from kquant import quantizers
from kquant.deploy.packing import pack_codes, packed_size, padding_is_zero, unpack_codes
from kquant.deploy.paths import structure
from kquant.quantizers.base import _autocast_seam, exact_dtype

FORMAT = "kquant-deploy"
VERSION = 2
MANIFEST = "manifest"


class DeployFormatError(ValueError):
    """A deploy file that is not exactly what its manifest says."""


# -- level tables ----------------------------------------------------------------
def _reference_levels(quantizer, params, rank, bits):
    """``[C or 1, 2^bits]``: the quantizer's ``decode`` of every code with ``params``."""
    grid = np.arange(2**bits).reshape((2**bits,) + (1,) * (rank - 1))
    decoded = np.asarray(ops.convert_to_numpy(quantizer.decode(grid, params, "float32")),
                         np.float64)
    return decoded.reshape(2**bits, -1).T


def _channel_index(shape, axis):
    index = np.arange(shape[axis]).reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return np.broadcast_to(index, shape)


def level_table(codes, values, bits):
    """``(levels [C, 2^bits], channel_axis)``: the value of each code, per tensor if one
    table fits, else per slice of the first axis (from the last) that fits."""
    codes = np.asarray(codes, np.int64)
    values = np.asarray(values, np.float32)
    for axis in [None, *range(codes.ndim - 1, -1, -1)]:
        rows = np.zeros(codes.shape, np.int64) if axis is None else _channel_index(codes.shape, axis)
        count = 1 if axis is None else codes.shape[axis]
        table = np.full((count, 2**bits), np.nan, np.float32)
        table[rows.ravel(), codes.ravel()] = values.ravel()
        if np.array_equal(table[rows.ravel(), codes.ravel()].view(np.uint32),
                          values.ravel().view(np.uint32)):
            return table, axis
    raise ValueError("the quantized kernel is not a function of its codes per tensor or per "
                     "slice of one axis; cannot store it as codes + levels.")


def decode_table(codes, levels, axis):
    """Kernel values from codes and a level table (inverse of :func:`level_table`)."""
    rows = np.zeros(codes.shape, np.int64) if axis is None else _channel_index(codes.shape, axis)
    return levels[rows, codes]


def _close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b)) if b.size else 0.0
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=1e-6 * scale + 1e-30)


# -- export --------------------------------------------------------------------
def _float32_kernel(layer):
    """The layer's inference kernel before any cast to its compute dtype (the
    quantizer's float32 levels; its output dtype rule then sees float32)."""
    autocast_scope, _ = _autocast_seam()
    with autocast_scope("float32"):
        return layer.quantized_kernel(training=False)


def _keeps_float32(layer, bits):
    """Whether the trained ``layer`` uses its ``bits``-bit kernel in float32 though it
    computes in a narrower dtype (the levels would not survive the cast)."""
    compute = keras.backend.standardize_dtype(layer.compute_dtype)
    return compute != "float32" and exact_dtype(bits, compute) == "float32"


def _inference_config(config):
    """Model config with every kernel quantizer removed (kernels arrive decoded)."""
    if isinstance(config, dict):
        out = {k: _inference_config(v) for k, v in config.items()}
        if "kernel_quantizer" in out and "input_quantizer" in out:
            out["kernel_quantizer"] = None
        return out
    if isinstance(config, list):
        return [_inference_config(v) for v in config]
    return config


def _numpy(variable):
    return np.asarray(ops.convert_to_numpy(variable))


class Export:
    """An export in memory: inference config, manifest entries and arrays."""

    def __init__(self, config):
        self.config = config
        self.entries = []
        self.arrays = {}

    def add(self, entry, **arrays):
        self.entries.append(entry)
        for part, value in arrays.items():
            self.arrays[f"{entry['path']}:{part.replace('__', ':')}"] = value

    def entry(self, path):
        return next(e for e in self.entries if e["path"] == path)

    def write(self, path):
        checksums = {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
                     for k, v in self.arrays.items()}
        manifest = {"format": FORMAT, "version": VERSION, "model_config": self.config,
                    "entries": self.entries, "sha256": checksums}
        blob = np.frombuffer(json.dumps(manifest).encode("utf-8"), np.uint8)
        with open(path, "wb") as f:
            np.savez(f, **{MANIFEST: blob}, **self.arrays)


def build_export(model):
    """The :class:`Export` of a built model (see the module docstring)."""
    from kquant.alq.layers import ALQLayer
    from kquant.layers.base import QuantizedLayerMixin

    if not model.built:
        raise ValueError("`model` must be built (call it once or give it an Input) to export.")
    variables, layers = structure(model)
    key_of = {id(v): k for k, v in variables.items()}
    exp = Export(_inference_config(json.loads(model.to_json())))
    done = set()
    for lpath, layer in layers.items():
        if isinstance(layer, QuantizedLayerMixin) and layer.kernel_quantizer is not None:
            q = layer.kernel_quantizer
            kernel = layer.latent_kernel
            values = ops.convert_to_numpy(_float32_kernel(layer))
            codes, params = q.encode(kernel)
            bits = int(q.precision)
            levels, axis = level_table(codes, values, bits)
            reference = _reference_levels(q, params, codes.ndim, bits)
            used = ~np.isnan(levels)
            reference = np.broadcast_to(reference, levels.shape) if reference.shape[0] == 1 \
                else reference
            if reference.shape != levels.shape or not _close(levels[used], reference[used]):
                raise ValueError(f"layer {layer.name!r}: the forward kernel disagrees with "
                                 f"{type(q).__name__}.decode; cannot export it exactly.")
            levels = np.where(used, levels, reference).astype(np.float32)
            kkey = key_of[id(kernel)]
            params = {k: np.asarray(v, np.float32) for k, v in params.items()}
            exp.add({"path": kkey, "kind": "quantized", "layer": layer.name,
                     "shape": list(codes.shape), "bits": bits, "channel_axis": axis,
                     "quantizer": quantizers.serialize(q),
                     "params": {k: list(v.shape) for k, v in params.items()}},
                    codes=pack_codes(codes, bits), levels=levels,
                    **{f"param__{k}": v for k, v in params.items()})
            done.add(id(kernel))
            shared = {id(w) for w in (layer.input_quantizer.weights
                                      if layer.input_quantizer is not None else [])}
            done.update(id(w) for w in q.weights if id(w) not in shared)
        elif isinstance(layer, ALQLayer):
            mask = _numpy(layer.mask).astype(np.float32) > 0
            bases = _numpy(layer.bases).astype(np.float32)    # [G, n, I]; int8/float8 storage
            coordinates = _numpy(layer.coordinates).astype(np.float32)
            if np.any(_numpy(layer.kernel_tap) != 0):
                raise ValueError(f"layer {layer.name!r}: `kernel_tap` is not zero; "
                                 "an ALQ model exports only between optimizer steps.")
            active = np.transpose(bases, (0, 2, 1))[mask]       # [A, n] in (group, slot) order
            exp.add({"path": lpath, "kind": "alq", "layer": layer.name,
                     "groups": int(mask.shape[0]), "group_size": int(bases.shape[1]),
                     "max_bits": int(mask.shape[1]), "active": int(mask.sum())},
                    mask=pack_codes(mask.astype(np.int64), 1),
                    bases=pack_codes((active > 0).astype(np.int64), 1),
                    coordinates=coordinates[mask])
            done.update(id(v) for v in (layer.bases, layer.coordinates, layer.mask,
                                         layer.kernel_tap))
    for key, v in variables.items():
        if id(v) in done:
            continue
        value = _numpy(v)
        exp.add({"path": key, "kind": "float", "shape": list(value.shape),
                 "dtype": str(value.dtype)}, value=value)
    return exp


def export_weights(model, path, fold_batch_norm=False):
    """Write ``model`` as a native deploy file; return one size row per quantized tensor.

    ``fold_batch_norm=True`` folds every BatchNormalization that directly follows a
    quantized Dense/Conv layer into its level table and bias (:mod:`.folding`).
    """
    exp = build_export(model)
    if fold_batch_norm:
        from kquant.deploy.folding import fold_batch_norms

        fold_batch_norms(model, exp)
    exp.write(path)
    return size_rows(exp)


def size_rows(exp):
    rows = []
    for e in exp.entries:
        if e["kind"] == "quantized":
            n = math.prod(e["shape"])
            rows.append({"layer": e["layer"], "path": e["path"], "bits": e["bits"],
                         "weights": n, "packed_bytes": int(exp.arrays[f"{e['path']}:codes"].nbytes),
                         "float32_bytes": 4 * n})
        elif e["kind"] == "alq":
            n = e["groups"] * e["group_size"]
            packed = sum(int(exp.arrays[f"{e['path']}:{p}"].nbytes)
                         for p in ("mask", "bases", "coordinates"))
            rows.append({"layer": e["layer"], "path": e["path"],
                         "bits": e["active"] / e["groups"], "weights": n,
                         "packed_bytes": packed, "float32_bytes": 4 * n})
    return rows


# -- load ------------------------------------------------------------------------
def _fail(path, message):
    raise DeployFormatError(f"{path}: {message}")


def read_file(path):
    """``(manifest, arrays)`` of a deploy file, fully validated (see :func:`validate`)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        _fail(path, f"not a kquant deploy file (cannot read it as .npz: {e}).")
    if MANIFEST not in arrays:
        _fail(path, f"missing array {MANIFEST!r}: not a kquant deploy file.")
    try:
        manifest = json.loads(arrays.pop(MANIFEST).astype(np.uint8).tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        _fail(path, f"array {MANIFEST!r} is not valid JSON ({e}).")
    validate(manifest, arrays, path)
    return manifest, arrays


def _expected_arrays(entry, path):
    """``{array name: (dtype, shape)}`` an entry implies."""
    p, kind = entry.get("path"), entry.get("kind")
    if kind == "quantized":
        n, bits = math.prod(entry["shape"]), int(entry["bits"])
        axis = entry["channel_axis"]
        channels = 1 if axis is None else int(entry["shape"][axis])
        out = {f"{p}:codes": ("uint8", (packed_size(n, bits),)),
               f"{p}:levels": ("float32", (channels, 2**bits))}
        out.update({f"{p}:param:{k}": ("float32", tuple(s)) for k, s in entry["params"].items()})
        if entry.get("fold_scale"):
            out[f"{p}:fold_scale"] = ("float32", (channels,))
        return out
    if kind == "alq":
        g, n, i, a = (int(entry[k]) for k in ("groups", "group_size", "max_bits", "active"))
        return {f"{p}:mask": ("uint8", (packed_size(g * i, 1),)),
                f"{p}:bases": ("uint8", (packed_size(a * n, 1),)),
                f"{p}:coordinates": ("float32", (a,))}
    if kind == "float":
        return {f"{p}:value": (entry["dtype"], tuple(entry["shape"]))}
    _fail(path, f"manifest entry {p!r} has unknown kind {kind!r}.")


def validate(manifest, arrays, path):
    """Every check a deploy file must pass; :class:`DeployFormatError` names the array."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        _fail(path, f"array {MANIFEST!r}: format is {manifest.get('format')!r}, "
                    f"expected {FORMAT!r}." if isinstance(manifest, dict)
              else f"array {MANIFEST!r} is not a JSON object.")
    if manifest.get("version") != VERSION:
        _fail(path, f"array {MANIFEST!r}: version {manifest.get('version')!r} is not supported "
                    f"(this kquant reads version {VERSION}).")
    for field in ("model_config", "entries", "sha256"):
        if field not in manifest:
            _fail(path, f"array {MANIFEST!r}: field {field!r} is missing.")
    expected = {}
    try:
        for entry in manifest["entries"]:
            if entry.get("kind") == "quantized":
                _check_bits(entry, path)
            expected.update(_expected_arrays(entry, path))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        if isinstance(e, DeployFormatError):
            raise
        _fail(path, f"array {MANIFEST!r}: malformed entry ({type(e).__name__}: {e}).")
    missing = sorted(set(expected) - set(arrays))
    if missing:
        _fail(path, f"missing array {missing[0]!r}" + (f" (and {missing[1:]})" if missing[1:] else "")
              + ".")
    extra = sorted(set(arrays) - set(expected))
    if extra:
        _fail(path, f"unexpected array {extra[0]!r} (not in the manifest).")
    for name, (dtype, shape) in expected.items():
        a = arrays[name]
        if str(a.dtype) != dtype or tuple(a.shape) != tuple(shape):
            _fail(path, f"array {name!r} is {a.dtype}{list(a.shape)}, the manifest says "
                        f"{dtype}{list(shape)}.")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            _fail(path, f"array {name!r} holds NaN or infinite values.")
    for entry in manifest["entries"]:
        _validate_entry(entry, arrays, path)
    for name in expected:
        digest = hashlib.sha256(np.ascontiguousarray(arrays[name]).tobytes()).hexdigest()
        if manifest["sha256"].get(name) != digest:
            _fail(path, f"array {name!r}: SHA-256 checksum mismatch (the array was changed "
                        "after export).")


def _check_bits(entry, path):
    """The entry's quantizer, built, and its bits equal to the entry's."""
    p, bits = entry["path"], int(entry["bits"])
    try:
        q = quantizers.get(entry["quantizer"])
    except Exception as e:  # noqa: BLE001 - any failure is a bad manifest entry
        _fail(path, f"array {p + ':codes'!r}: quantizer {entry['quantizer']!r} cannot be "
                    f"built ({e}).")
    if int(q.precision) != bits:
        _fail(path, f"array {p + ':codes'!r}: bits {bits} disagree with the quantizer "
                    f"{type(q).__name__} ({q.precision} bits).")
    return q


def _validate_entry(entry, arrays, path):
    p = entry["path"]
    if entry["kind"] == "quantized":
        bits, shape = int(entry["bits"]), tuple(entry["shape"])
        q = _check_bits(entry, path)
        if not padding_is_zero(arrays[f"{p}:codes"], math.prod(shape), bits):
            _fail(path, f"array {p + ':codes'!r}: bits after the last code are not zero.")
        params = {k: arrays[f"{p}:param:{k}"] for k in entry["params"]}
        levels = arrays[f"{p}:levels"]
        try:
            reference = _reference_levels(q, params, len(shape), bits)
        except Exception as e:  # noqa: BLE001
            _fail(path, f"array {p + ':levels'!r}: the quantizer {type(q).__name__} cannot "
                        f"decode with the stored params ({e}).")
        fold = entry.get("fold_scale")
        if fold is not None:
            reference = reference * np.asarray(arrays[f"{p}:fold_scale"], np.float64)[:, None]
        if reference.shape[0] == 1:
            reference = np.broadcast_to(reference, levels.shape)
        if not _close(levels, reference):
            _fail(path, f"array {p + ':levels'!r} disagrees with the quantizer "
                        f"{type(q).__name__} and its params.")
    elif entry["kind"] == "alq":
        g, i, a = int(entry["groups"]), int(entry["max_bits"]), int(entry["active"])
        mask = unpack_codes(arrays[f"{p}:mask"], 1, (g * i,))
        if not padding_is_zero(arrays[f"{p}:mask"], g * i, 1) or int(mask.sum()) != a:
            _fail(path, f"array {p + ':mask'!r}: {int(mask.sum())} active bases, the manifest "
                        f"says {a}.")
        if not padding_is_zero(arrays[f"{p}:bases"], a * int(entry["group_size"]), 1):
            _fail(path, f"array {p + ':bases'!r}: bits after the last basis are not zero.")
        if np.any(arrays[f"{p}:coordinates"] < 0):
            _fail(path, f"array {p + ':coordinates'!r}: ALQ coordinates must be >= 0.")


def load_inference_model(path):
    """The inference model stored by :func:`export_weights` (predictions bit-identical)."""
    from kquant.deploy import folding  # noqa: F401 - registers BinaryThreshold (folded BN)

    manifest, arrays = read_file(path)
    try:
        model = keras.models.model_from_json(json.dumps(manifest["model_config"]))
    except Exception as e:  # noqa: BLE001
        _fail(path, f"array {MANIFEST!r}: model_config cannot be rebuilt ({type(e).__name__}: {e}).")
    variables, layers = structure(model)
    assigned = set()
    for entry in manifest["entries"]:
        p, kind = entry["path"], entry["kind"]
        if kind == "alq":
            targets = {part: f"{p}/{part}" for part in ("bases", "coordinates", "mask", "kernel_tap")}
        else:
            targets = {"value": p}
        first_array = f"{p}:" + {"quantized": "codes", "float": "value"}.get(kind, "mask")
        for key in targets.values():
            if key not in variables:
                _fail(path, f"array {first_array!r}: the model has no variable at path {key!r}.")
        if kind == "quantized":
            shape = tuple(entry["shape"])
            codes = unpack_codes(arrays[f"{p}:codes"], int(entry["bits"]), shape)
            value = decode_table(codes, arrays[f"{p}:levels"], entry["channel_axis"])
            _assign(variables[p], value, f"{p}:codes", path)
            layer = layers.get(p.rsplit("/", 1)[0])
            if layer is not None and _keeps_float32(layer, int(entry["bits"])):
                _never_autocast(variables[p])
        elif kind == "float":
            _assign(variables[p], arrays[f"{p}:value"], f"{p}:value", path)
        else:
            g, n, i = int(entry["groups"]), int(entry["group_size"]), int(entry["max_bits"])
            mask = unpack_codes(arrays[f"{p}:mask"], 1, (g, i)).astype(bool)
            bases = np.ones((g, i, n), np.float32)
            bases[mask] = 2.0 * unpack_codes(arrays[f"{p}:bases"], 1, (int(mask.sum()), n)) - 1.0
            coordinates = np.zeros((g, i), np.float32)
            coordinates[mask] = arrays[f"{p}:coordinates"]
            for part, value in (("bases", np.transpose(bases, (0, 2, 1))),
                                ("coordinates", coordinates), ("mask", mask.astype(np.float32))):
                _assign(variables[targets[part]], value, f"{p}:{part}", path)
            tap = variables[targets["kernel_tap"]]
            tap.assign(np.zeros(tap.shape, np.float32))
        assigned.update(targets.values())
    unset = sorted(set(variables) - assigned)
    if unset:
        _fail(path, f"no stored array for the model variable at path {unset[0]!r} "
                    f"(expected array {unset[0] + ':value'!r}).")
    return model


def _never_autocast(variable):
    """Read ``variable`` in its own dtype inside its layer's autocast scope, as the
    trained layer read its float32 kernel (Keras' variable flag; one seam)."""
    variable._autocast = False


def _assign(variable, value, name, path):
    if tuple(variable.shape) != tuple(np.shape(value)):
        _fail(path, f"array {name!r} has shape {list(np.shape(value))}, the model variable "
                    f"{variable.path!r} has shape {list(variable.shape)}.")
    # cast by the backend: int8 / float8 ALQ storage as well as float variables
    variable.assign(ops.cast(ops.convert_to_tensor(np.asarray(value)), variable.dtype))


def inspect_export(path):
    """Per quantized tensor: bits, weight count, packed bytes, distinct codes."""
    manifest, arrays = read_file(path)
    rows = []
    for e in manifest["entries"]:
        p = e["path"]
        if e["kind"] == "quantized":
            shape = tuple(e["shape"])
            codes = unpack_codes(arrays[f"{p}:codes"], int(e["bits"]), shape)
            rows.append({"kernel": p, "layer": e["layer"], "bits": int(e["bits"]),
                         "weights": math.prod(shape), "packed_bytes": int(arrays[f"{p}:codes"].nbytes),
                         "distinct_codes": int(np.unique(codes).size)})
        elif e["kind"] == "alq":
            rows.append({"kernel": p, "layer": e["layer"], "bits": e["active"] / e["groups"],
                         "weights": e["groups"] * e["group_size"],
                         "packed_bytes": sum(int(arrays[f"{p}:{k}"].nbytes)
                                             for k in ("mask", "bases", "coordinates")),
                         "distinct_codes": 2})
    return rows
