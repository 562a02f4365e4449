"""Config instantiation and the one place that reads and writes checkpoint files (formats, sizes
before values, allow-listed unpickling, atomic writes); what a Stable Diffusion base holds is
:mod:`ldm.models.base_checkpoint`."""
from __future__ import annotations

import errno
import importlib
import json
import logging
import math
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ldm.config_bounds import BoundsError, check_bounds

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the file and the key."""


def get_obj_from_str(string: str) -> Any:
    module, cls = string.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


def instantiate_from_config(config: Mapping[str, Any], **kwargs: Any) -> Any:
    """Build ``config["target"](**config["params"], **kwargs)`` (CompVis convention).

    This imports and calls whatever ``target`` names: a config is code. Configs that arrive
    inside files (checkpoints, adapters, run folders) go through :func:`check_stored_config`
    first.
    """
    if "target" not in config:
        raise KeyError(f"config has no 'target' to instantiate: {dict(config)}")
    params = dict(config.get("params") or {})
    return get_obj_from_str(config["target"])(**params, **kwargs)


class UntrustedConfigError(CheckpointError):
    """A config stored in a file names something outside the allow-list of buildable classes."""


#: Classes outside ``ldm`` that a stored config may name (Lightning loggers and callbacks).
TRUSTED_EXTERNAL_TARGETS = frozenset(
    {
        "pytorch_lightning.loggers.CSVLogger",
        "pytorch_lightning.loggers.TensorBoardLogger",
        "pytorch_lightning.loggers.WandbLogger",
        "pytorch_lightning.callbacks.ModelCheckpoint",
        "pytorch_lightning.callbacks.LearningRateMonitor",
    }
)
_PROJECT_TARGET = re.compile(r"^ldm(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def is_trusted_target(target: Any) -> bool:
    """Whether a stored config may build ``target``: a class defined in the ``ldm`` package
    (not a function, not a name ``ldm`` merely imports) or one of :data:`TRUSTED_EXTERNAL_TARGETS`.

    Nothing outside ``ldm`` is imported to decide.
    """
    if not isinstance(target, str):
        return False
    if target in TRUSTED_EXTERNAL_TARGETS:
        return True
    if not _PROJECT_TARGET.match(target):
        return False
    try:
        obj = get_obj_from_str(target)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(obj, type) and obj.__module__.split(".")[0] == "ldm"


def _interpolated_targets(node: DictConfig | ListConfig, path: str = "") -> Iterable[str]:
    """Dotted paths in ``node`` where an interpolation (``${...}``) gives a ``target`` or a
    section that holds one: values from elsewhere that would decide what is built."""
    keys: Iterable[Any] = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        where = f"{path}.{key}" if path else str(key)
        if OmegaConf.is_interpolation(node, key):
            try:
                value = node[key]
            except OmegaConfBaseException:
                continue  # reported when the config is resolved
            if key == "target" or (
                isinstance(value, (DictConfig, ListConfig)) and any(True for _ in _config_targets(OmegaConf.to_container(value)))
            ):
                yield where
            continue
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_none() and not child._is_missing():
            yield from _interpolated_targets(child, where)


def _config_targets(node: Any) -> Iterable[Any]:
    if isinstance(node, Mapping):
        if "target" in node:
            yield node["target"]
        for value in node.values():
            yield from _config_targets(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _config_targets(value)


def check_stored_config(config: Any, source: str | Path) -> None:
    """Refuse a config read from a file the user did not write unless every ``target`` is trusted
    and every size and learning rate is within bounds.

    A YAML passed with ``--base`` (or ``--config``) is code, as in CompVis, and is not checked.
    A config stored in a checkpoint, an adapter export or a shared run folder is data: each
    ``target`` anywhere in it (interpolations resolved) must pass :func:`is_trusted_target`,
    and its sizes :func:`ldm.config_bounds.check_bounds` (no absurd model is built from it).

    Raises:
        UntrustedConfigError: one line naming the file and the refused target or key.
    """
    if isinstance(config, (DictConfig, ListConfig)):
        for where in _interpolated_targets(config):
            raise UntrustedConfigError(
                f"{source}: {where} is an interpolation that decides what is built; a stored config must name its classes literally"
            )
        try:
            config = OmegaConf.to_container(config, resolve=True)
        except OmegaConfBaseException as err:
            raise UntrustedConfigError(f"{source}: its stored config does not resolve ({type(err).__name__})") from None
    for target in _config_targets(config):
        if not is_trusted_target(target):
            raise UntrustedConfigError(
                f"{source}: refusing to build {target!r} from a stored config; only the project's own "
                f"classes (ldm.*) are built from files (pass a config you trust with --config or --base)"
            )
    if isinstance(config, Mapping):
        try:
            check_bounds(config)
        except BoundsError as err:
            raise UntrustedConfigError(f"{source}: its stored config is refused: {err}") from None


class _LightningCallbackKey:
    """Stands in for ``ModelCheckpoint``: old SD ``.ckpt`` files use that class as a dict key.

    Registering this placeholder under the class's pickled name lets ``weights_only`` loading
    read those files without importing or trusting anything else.
    """


_LEGACY_CKPT_GLOBALS: list[Any] = [
    (_LightningCallbackKey, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    np.dtype,
    type(np.dtype(np.float64)),
]
try:
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import scalar as _np_scalar
_LEGACY_CKPT_GLOBALS += [(_np_scalar, "numpy.core.multiarray.scalar"), (_np_scalar, "numpy._core.multiarray.scalar")]


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only``; memory-mapped where the file format allows it.

    Mapping a 4 GB SD checkpoint instead of reading it keeps the copy that loading into the
    model makes from doubling the peak memory. Files written before torch 1.6 cannot be mapped.
    """
    with torch.serialization.safe_globals(_LEGACY_CKPT_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "zipfile" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)


#: The first bytes of a legacy (pre-zip) ``torch.save`` file: the pickled magic number.
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
_ZIP_MAGIC = b"PK\x03\x04"


def _is_safetensors(head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON object."""
    return len(head) > 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


def _zip_members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint (a truncated or corrupted zip archive: {err})") from None


def is_torchscript_archive(members: Iterable[str]) -> bool:
    """Whether zip ``members`` are a TorchScript archive (``<name>/code/...``) rather than ``torch.save`` data."""
    return any(name.split("/")[1:2] == ["code"] for name in members)


def checkpoint_format(path: Path) -> str:
    """What a file is, from its first bytes: ``safetensors``, ``torch-zip``, ``torchscript`` or ``torch-legacy``.

    Raises:
        CheckpointError: a directory, an empty file or bytes of no known weight format.
    """
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: is empty (0 bytes), not a checkpoint")
    with open(path, "rb") as handle:
        head = handle.read(len(_LEGACY_TORCH_MAGIC))
    if _is_safetensors(head, size):
        return "safetensors"
    if head.startswith(_ZIP_MAGIC):
        members = _zip_members(path)
        if is_torchscript_archive(members):
            return "torchscript"
        if any(name.endswith("data.pkl") for name in members):
            return "torch-zip"
        raise CheckpointError(f"{path}: not a checkpoint (a zip archive without PyTorch's data.pkl)")
    if head == _LEGACY_TORCH_MAGIC:
        return "torch-legacy"
    raise CheckpointError(
        f"{path}: not a checkpoint (neither a PyTorch .ckpt/.pt/.bin file nor safetensors; is it the right file?)"
    )


def _unpickling_refusal(err: Exception) -> str | None:
    """The global a ``weights_only`` load refused, if that is why it failed."""
    match = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", str(err))
    return match.group(1) if match else None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ------------------------------------------------------------- sizes before values
#: Bytes per element of the safetensors dtypes.
_SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8,
}  # fmt: skip
#: safetensors' own limit on the JSON header.
_SAFETENSORS_MAX_HEADER = 100_000_000


def format_bytes(count: int) -> str:
    """``count`` bytes in words: ``4 bytes``, ``2.0 KiB``, ``256.0 GiB``."""
    if count < 1024:
        return f"{count} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        count /= 1024
        if count < 1024 or unit == "PiB":
            return f"{count:.1f} {unit}"
    raise AssertionError("unreachable")


class OversizedTensorError(CheckpointError):
    """A file whose tensors claim more data than they hold (stride-0, truncated, a zip bomb)."""


def _claim_refusal(path: str | Path, key: str, shape: Any, claimed: int, held: int) -> OversizedTensorError:
    return OversizedTensorError(
        f"{path}: key '{key}' claims shape {list(shape)} ({format_bytes(claimed)}) but holds {format_bytes(held)} "
        f"of data (an expanded or truncated tensor: a damaged or hostile file)"
    )


def check_tensor_storage(key: str, value: torch.Tensor, path: str | Path) -> None:
    """Refuse a tensor whose shape claims more bytes than its storage holds.

    A stride-0 (expanded) ``[2**18, 2**18]`` tensor fits in 4 bytes of a file, and whatever
    reads its values (a finite check, ``.to(dtype)``, ``.contiguous()``) allocates all 256 GiB.
    This looks at sizes only: nothing is read or allocated.
    """
    if value.layout != torch.strided:
        raise OversizedTensorError(f"{path}: key '{key}' is a {value.layout} tensor; only dense tensors are read")
    claimed = value.numel() * value.element_size()
    held = value.untyped_storage().nbytes() - value.storage_offset() * value.element_size()
    if claimed > held:
        raise _claim_refusal(path, key, value.shape, claimed, held)


def check_loaded_tensors(content: Any, path: str | Path) -> None:
    """:func:`check_tensor_storage` for every tensor anywhere in ``content`` (nested dicts,
    lists, tuples: a checkpoint's optimizer state too), named by its dotted key."""
    stack: list[tuple[str, Any]] = [("", content)]
    while stack:
        prefix, node = stack.pop()
        if isinstance(node, torch.Tensor):
            check_tensor_storage(prefix, node, path)
        elif isinstance(node, Mapping):
            stack += [(f"{prefix}.{key}" if prefix else str(key), value) for key, value in node.items()]
        elif isinstance(node, (list, tuple)):
            stack += [(f"{prefix}.{index}" if prefix else str(index), value) for index, value in enumerate(node)]


class _Inert:
    """Whatever a pickle names, while its storage claims are counted: accepts any call, state
    or item and does nothing (no class the pickle names is imported)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _StorageClaimCounter(pickle.Unpickler):
    """Reads a legacy ``torch.save`` pickle for its storage claims (``persistent_load`` ids
    ``('storage', type, key, location, numel, ...)``), building nothing."""

    def __init__(self, handle: Any):
        super().__init__(handle)
        self.claims: dict[Any, int] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _SCRIPT_STORAGES:
            return _SCRIPT_STORAGES[name]
        return _Inert

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[4], int):
            itemsize = pid[1].itemsize if isinstance(pid[1], torch.dtype) else 1
            self.claims[repr(pid[2])] = max(pid[4], 0) * itemsize
        return _Inert()


def _legacy_claimed_bytes(path: Path) -> int:
    """The bytes a legacy (pre-zip) ``torch.save`` file's storages claim: ``torch.load``
    allocates each storage at its claimed size before reading its data from the file."""
    with open(path, "rb") as handle:
        for _ in range(3):  # magic number, protocol version, system info
            _StorageClaimCounter(handle).load()
        counter = _StorageClaimCounter(handle)
        counter.load()
    return sum(counter.claims.values())


def _check_safetensors_claims(path: Path, size: int) -> None:
    """Every tensor of a safetensors header has exactly its shape's bytes, inside the file."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 0 < length <= min(size - 8, _SAFETENSORS_MAX_HEADER):
            raise CheckpointError(f"{path}: not a readable safetensors file (a header of {length} bytes in a {size}-byte file)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError):
            raise CheckpointError(f"{path}: not a readable safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
    data = size - 8 - length
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            shape, (begin, end) = [int(n) for n in entry["shape"]], [int(n) for n in entry["data_offsets"]]
            itemsize = _SAFETENSORS_ITEMSIZE.get(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: not a readable safetensors file (key '{key}' has no dtype, shape and offsets)") from None
        held = max(0, min(end, data) - max(begin, 0))
        claimed = math.prod(shape) * (itemsize or 1)
        if any(n < 0 for n in shape) or not 0 <= begin <= end <= data or (itemsize and claimed != end - begin):
            raise _claim_refusal(path, key, shape, claimed, held)


_INFLATED_CODE_ALLOWANCE = 16 << 20
"""What the deflated records of a zip checkpoint (TorchScript's code) may add beyond the file's size."""


def check_storage_claims(path: str | Path) -> None:
    """Refuse a weight file whose tensors claim more data than the file holds, before it is loaded.

    ``torch.load`` allocates a legacy file's storages at their claimed sizes, and inflates
    compressed zip records (a zip bomb) when not memory-mapped; safetensors headers are
    checked too, to name the key. Nothing of the file's data is read.
    """
    path = Path(path)
    kind = checkpoint_format(path)
    size = path.stat().st_size
    if kind == "safetensors":
        _check_safetensors_claims(path, size)
        return
    if kind == "torch-legacy":
        try:
            claimed = _legacy_claimed_bytes(path)
        except Exception as err:  # noqa: BLE001 - a corrupt pickle fails in arbitrary ways
            raise CheckpointError(f"{path}: not a readable checkpoint (corrupted or truncated? {_first_line(err)})") from None
        allowance = 0
    else:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
        claimed = sum(info.file_size for info in records)
        # torch stores tensors uncompressed; a TorchScript archive also deflates its code
        deflated = any(info.compress_type != zipfile.ZIP_STORED for info in records)
        allowance = _INFLATED_CODE_ALLOWANCE if deflated else 0
    if claimed > size + allowance:
        raise OversizedTensorError(
            f"{path}: its tensors claim {format_bytes(claimed)} of data in a file of {format_bytes(size)} "
            f"(a damaged or hostile file)"
        )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ``.ckpt``/``.pt``/``.bin`` (safely, ``weights_only=True``) or ``.safetensors`` file.

    The format is recognised from the file's first bytes, not its name. A TorchScript archive
    is refused without being opened (loading it runs its code). Sizes come before values: the
    data the file's tensors claim is checked against the file before loading
    (:func:`check_storage_claims`), and each loaded tensor's shape against its storage
    (:func:`check_loaded_tensors`), so a small file cannot make anything allocate more than it holds.
    """
    path = Path(path)
    kind = checkpoint_format(path)
    if kind == "torchscript":
        raise CheckpointError(
            f"{path}: a TorchScript archive (a program, not a checkpoint of weights); it is not loaded, "
            f"since loading it would run its code"
        )
    check_storage_claims(path)
    if kind == "safetensors":
        try:
            content = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        check_loaded_tensors(content, path)
        return content
    try:
        content = _torch_load(path)
    except Exception as err:  # noqa: BLE001 - corrupt pickles fail in arbitrary ways (IndexError, KeyError, ...)
        refused = _unpickling_refusal(err)
        if refused:
            raise CheckpointError(
                f"{path}: refused to unpickle '{refused}' (only tensors and plain data are read; a checkpoint "
                f"naming other code may try to run it)"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupted or truncated? {_first_line(err)})") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(content).__name__}")
    check_loaded_tensors(content, path)
    return content


# ------------------------------------------------------------- TorchScript
#: Storage classes a TorchScript archive may name, and their element types.
_SCRIPT_STORAGES = {
    f"{name}Storage": dtype
    for name, dtype in {
        "Float": torch.float32, "Double": torch.float64, "Half": torch.float16, "BFloat16": torch.bfloat16,
        "Long": torch.int64, "Int": torch.int32, "Short": torch.int16, "Char": torch.int8,
        "Byte": torch.uint8, "Bool": torch.bool,
    }.items()
}  # fmt: skip


class _ScriptObject:
    """A TorchScript object (a module) read as data: the state it was saved with, never its code."""

    qualified_name = "__torch__"

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return storage.as_strided(size, stride, offset)


def _identity(value: Any, *_: Any) -> Any:
    return value


class _ScriptArchiveUnpickler(pickle.Unpickler):
    """Reads ``data.pkl`` of a TorchScript archive: tensors, plain data and module objects as
    :class:`_ScriptObject`; any other global is refused, and no method of the archive runs."""

    _FUNCTIONS = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("collections", "OrderedDict"): dict,
        ("torch.jit._pickle", "restore_type_tag"): _identity,
        **{("torch.jit._pickle", f"build_{kind}list"): list for kind in ("int", "double", "bool", "tensor")},
    }

    def __init__(self, archive: zipfile.ZipFile, prefix: str, source: Path):
        super().__init__(archive.open(f"{prefix}data.pkl"))
        self.archive, self.prefix, self.source = archive, prefix, source

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_ScriptObject,), {"qualified_name": f"{module}.{name}"})
        if module == "torch" and name in _SCRIPT_STORAGES:
            return _SCRIPT_STORAGES[name]
        if (module, name) in self._FUNCTIONS:
            return self._FUNCTIONS[(module, name)]
        raise CheckpointError(f"{self.source}: refused to read '{module}.{name}' from a TorchScript archive")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise CheckpointError(f"{self.source}: unexpected storage reference in its TorchScript archive")
        _, dtype, key, _location, numel = pid
        raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        storage = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        if storage.numel() != numel:
            raise CheckpointError(f"{self.source}: storage {key} of its TorchScript archive is truncated")
        return storage


def _script_tensors(node: Any, prefix: str, source: Path) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(node, torch.Tensor):
        check_tensor_storage(prefix.rstrip("."), node, source)
        yield prefix.rstrip("."), node
    elif isinstance(node, _ScriptObject):
        state = getattr(node, "state", None)
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{source}: '{node.qualified_name}' of its TorchScript archive keeps a custom state that only "
                f"its own code can read; use a plain state-dict or safetensors file of the same weights"
            )
        for name, value in state.items():
            yield from _script_tensors(value, f"{prefix}{name}.", source)


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive (``torch.jit.save``), read without running its code.

    ``torch.jit.load`` compiles and runs the archive's code (a ``__setstate__`` can do anything).
    Here only ``data.pkl`` is unpickled, by an unpickler that builds tensors, plain containers
    and inert module objects; the result names every tensor attribute by its module path
    (``visual.conv1.weight``): the parameters and buffers, and any other tensor attribute.
    """
    path = Path(path)
    if checkpoint_format(path) != "torchscript":
        raise CheckpointError(f"{path}: not a TorchScript archive")
    check_storage_claims(path)
    with zipfile.ZipFile(path) as archive:
        members = archive.namelist()
        prefix = next((name[: -len("data.pkl")] for name in members if name.endswith("/data.pkl")), None)
        if prefix is None:
            raise CheckpointError(f"{path}: a TorchScript archive without data.pkl")
        if f"{prefix}byteorder" in members and archive.read(f"{prefix}byteorder").strip() != b"little":
            raise CheckpointError(f"{path}: a big-endian TorchScript archive is not supported")
        try:
            root = _ScriptArchiveUnpickler(archive, prefix, path).load()
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - a damaged pickle fails in arbitrary ways
            raise CheckpointError(f"{path}: not a readable TorchScript archive ({_first_line(err)})") from None
    return dict(_script_tensors(root, "", path))


def shared_file_mode() -> int:
    """The permissions of a new file that others may read, as the umask allows (``0o644`` for
    the usual ``022``); temporary files are created ``0o600``, which must not survive a rename."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


#: Free bytes below which a failed write is taken for a full disk.
_FULL_DISK_BYTES = 1 << 20


def _write_failure(err: Exception, folder: Path) -> OSError | None:
    """The ``OSError`` behind a writer's own exception, or None if it is not a write failure.

    ``torch.save`` to a path reports a full disk as ``RuntimeError`` ("unexpected pos ...", no
    errno), safetensors as ``SafetensorError`` ("I/O error: ... (os error 28)"); callers that
    handle ``OSError`` (one line, exit status 1) must see them as such. The disk is looked at
    while the partial file still fills it.
    """
    if isinstance(err, SafetensorError):
        match = re.search(r"\(os error (\d+)\)", str(err))
        return OSError(int(match.group(1)), os.strerror(int(match.group(1)))) if match else None
    if isinstance(err, RuntimeError):
        usage = os.statvfs(folder)
        if usage.f_bavail * usage.f_frsize < _FULL_DISK_BYTES:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write a file for sharing: ``write(temporary)`` in the destination folder, fsync, then
    rename over ``path`` with :func:`shared_file_mode`. Readers never see a partial file; on
    any failure the partial file is removed and a previous ``path`` is kept.

    Raises:
        OSError: the write failed, a full disk included, whichever library wrote.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        try:
            write(temporary)
        except (RuntimeError, SafetensorError) as err:
            failure = _write_failure(err, path.parent)
            if failure is None:
                raise
            raise failure from err
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, shared_file_mode())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write weights as ``.safetensors`` or as a CompVis-style ``.ckpt`` (``{"state_dict": ...}``),
    atomically (:func:`write_atomically`: a failure, a full disk included, is an ``OSError``
    and leaves no partial file)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        tensors = {k: v.clone() for k, v in tensors.items()}
        write_atomically(path, lambda temporary: save_file(tensors, str(temporary)))
    else:
        write_atomically(path, lambda temporary: torch.save({"state_dict": tensors}, temporary))


def check_state_dict(
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
    path: str | Path,
    required_keys: Iterable[str],
) -> None:
    """Raise :class:`CheckpointError` for a missing required key, a shape mismatch, or values
    that would silently give black images: integers where the model holds floats (they are
    cast on loading), NaN or infinity."""
    missing = sorted(k for k in required_keys if k not in found)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing key '{missing[0]}'{more}")
    for key, value in found.items():
        if key not in expected:
            continue
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path}: key '{key}' has shape {list(value.shape)} but the model expects "
                f"{list(expected[key].shape)}; is this a checkpoint of another base model?"
            )
        check_tensor_values(key, value, expected[key].is_floating_point(), path)


def check_tensor_values(key: str, value: torch.Tensor, floating: bool, path: str | Path) -> None:
    """Refuse integer values for a floating-point weight and non-finite values anywhere; the
    tensor's storage is checked first (:func:`check_tensor_storage`), since reading the values
    of an expanded tensor allocates its full size."""
    if value.device.type != "meta":
        check_tensor_storage(key, value, path)
    if floating and not value.is_floating_point():
        raise CheckpointError(
            f"{path}: key '{key}' holds {str(value.dtype).removeprefix('torch.')} values; "
            f"weights must be floating point (a damaged or wrongly converted file?)"
        )
    if value.is_floating_point() and value.device.type != "meta" and not bool(torch.isfinite(value).all()):
        raise CheckpointError(f"{path}: key '{key}' holds NaN or infinite values (a damaged or diverged file?)")


