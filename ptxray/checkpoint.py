"""Save and load training checkpoints: atomically, and loadable with `torch.load(weights_only=True)`.

A checkpoint is a plain dict of tensors, containers and scalars, so `weights_only=True` (which
refuses to unpickle arbitrary objects, and is torch's default) can read it. That rules out the
numpy and `random` RNG state objects as they come, so `capture_rng_state` converts them to tensors
and ints, and `restore_rng_state` converts them back.

Local files are written to a temporary file in the same directory, fsynced and renamed over the
target (`os.replace` is atomic on POSIX within one filesystem): a crash mid-save leaves the old
checkpoint intact. An `s3://` object is written by one upload through a single
`open_output_stream` (a PutObject, or a multipart upload for large objects or when pyarrow chooses
so): S3 makes the object visible only whole, when that upload completes.
"""

from __future__ import annotations

import io
import random
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptxray.storage import filesystem_and_path, is_uri, write_atomic


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or not loadable with weights_only=True."""


# Types `torch.load(weights_only=True)` accepts without an allow-list. Exact types on purpose:
# numpy scalars subclass float/int but pickle as numpy objects, which weights_only refuses.
_PLAIN_SCALARS = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)
_PLAIN_MAPPINGS = (dict, OrderedDict)
_PLAIN_SEQUENCES = (list, tuple)


def _check_plain(obj: Any, where: str) -> None:
    """Fail at save time, naming the key, rather than at load time with an unpickling error."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_SCALARS:
        return
    if type(obj) in _PLAIN_MAPPINGS:
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} is not a str/int")
            _check_plain(value, f"{where}.{key}")
        return
    if type(obj) in _PLAIN_SEQUENCES:
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where}: {type(obj).__name__} cannot be loaded with torch.load(weights_only=True); "
        "store tensors, plain containers and str/int/float/bool/None only"
    )


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to a local path (atomic rename) or an s3:// URI (one upload)."""
    _check_plain(state, "checkpoint")
    write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path_or_uri: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `torch.load(weights_only=True)`; CheckpointError names the path."""
    source = str(path_or_uri)
    try:
        data: Any = source
        if is_uri(source):
            filesystem, fs_path = filesystem_and_path(source)
            if filesystem.type_name == "local":
                data = fs_path
            else:
                with filesystem.open_input_stream(fs_path, compression=None) as f:
                    data = io.BytesIO(f.read())
        state = torch.load(data, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{source}: no such checkpoint") from None
    except Exception as e:  # truncated zip, bad pickle, disallowed global: all mean "unusable"
        raise CheckpointError(f"{source}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: expected a dict checkpoint, got {type(state).__name__}")
    return state


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the "module." prefix DDP / DataParallel put on every key (keys without it pass through)."""
    prefix = "module."
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU, and CUDA when available), numpy global and `random` states as plain data."""
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_kind),
            # (624,) uint32 Mersenne Twister keys; int64 keeps every value exact.
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": {
            "version": int(py_version),
            "internal": [int(v) for v in py_internal],
            "gauss_next": None if py_gauss_next is None else float(py_gauss_next),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state`; a CUDA state is restored when this machine has as many GPUs."""
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            int(numpy_state["pos"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        )
    )
    py_state = state["python"]
    random.setstate((int(py_state["version"]), tuple(int(v) for v in py_state["internal"]), py_state["gauss_next"]))
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


__all__ = [
    "CheckpointError",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "strip_module_prefix",
]
