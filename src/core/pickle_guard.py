"""A checkpoint never runs code: every pickle in it is checked before any library reads it.

Our own files load with ``torch.load(weights_only=True)``, but two libraries underneath do not:
DeepSpeed loads its shards with ``weights_only=False`` and torch.distributed.checkpoint (DCP)
reads its ``.metadata`` with plain ``pickle.load`` and its non-tensor entries with
``weights_only=False``. :func:`verify_checkpoint` walks a checkpoint folder and runs every pickle
those readers would open through an unpickler that builds nothing: each global a pickle names
must be on :data:`ALLOWED` (the exact classes and functions these formats need: tensor rebuild
functions, dtypes, DCP's metadata records, DeepSpeed's enums), otherwise the checkpoint is
refused with one line naming the file and the global. Nothing is imported, called or
constructed while checking, so a malicious file cannot act before it is refused.

``checkpoint.trust_pickles: true`` (``--trust-pickles`` on the command line) skips the check,
for checkpoints whose origin is known.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

from src.core.errors import CheckpointError

# Files that are never unpickled: text, JSON and safetensors (a header and raw bytes).
NOT_PICKLES = (".json", ".safetensors", ".txt", ".md", ".yaml", ".py", ".lock")
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".metadata"}
PLAIN_NAMES = {"COMMIT", "latest", "latest_universal"}
DCP_METADATA = ".metadata"
DCP_SHARD = ".distcp"

ALLOWED = frozenset(
    {
        # containers and small values
        "collections.OrderedDict",
        "builtins.set",
        "builtins.frozenset",
        "_codecs.encode",
        "pathlib.PosixPath",
        "pathlib._local.PosixPath",  # DCP records where it was written
        # tensors, as torch's own weights-only unpickler rebuilds them
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._tensor._rebuild_from_type_v2",
        "torch.Tensor",
        "torch.Size",
        "torch.serialization._get_layout",
        "torch.strided",
        *(
            f"torch.{name}"
            for name in (
                "float64",
                "float32",
                "float16",
                "bfloat16",
                "int64",
                "int32",
                "int16",
                "int8",
                "uint8",
                "bool",
            )
        ),
        *(
            f"torch.{name}Storage"
            for name in (
                "Float",
                "Double",
                "Half",
                "BFloat16",
                "Long",
                "Int",
                "Short",
                "Char",
                "Byte",
                "Bool",
            )
        ),
        # DCP's metadata records
        *(
            f"torch.distributed.checkpoint.metadata.{name}"
            for name in (
                "Metadata",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "TensorProperties",
                "MetadataIndex",
                "StorageMeta",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        "torch.distributed.checkpoint.filesystem._StorageInfo",
        # DeepSpeed's checkpoint records
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file whose pickle names a global outside :data:`ALLOWED`."""


class _Refused(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _Inert:
    """What every allowed global becomes while checking: accepts any call and any state."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def add(self, value):
        pass


class _Checker(pickle.Unpickler):
    """Reads a pickle to its end, resolving every global to :class:`_Inert` if allowed."""

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        if full not in ALLOWED:
            raise _Refused(full)
        return _Inert

    def persistent_load(self, pid):  # a tensor's storage in torch's zip format: not read
        return _Inert()


def check_pickle(data: bytes, where: str) -> int:
    """Check one pickle; returns the offset where it ended. Refuses a disallowed global."""
    stream = io.BytesIO(data)
    try:
        _Checker(stream).load()
    except _Refused as exc:
        raise UnsafeCheckpointError(
            f"{where}: refuses to load the pickled global {exc.name} (a checkpoint may not run "
            "code); for a checkpoint you trust set checkpoint.trust_pickles=true"
        ) from None
    except Exception as exc:  # not a pickle, truncated, or a structure no format of ours has
        raise CheckpointError(
            f"{where}: unreadable checkpoint file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    return stream.tell()


def _check_zip(data_or_path, where: str) -> None:
    """torch.save's zip format: every ``.pkl`` member is checked; TorchScript is refused."""
    with zipfile.ZipFile(data_or_path) as z:
        names = z.namelist()
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            raise UnsafeCheckpointError(
                f"{where}: holds TorchScript code, which a checkpoint may not; set "
                "checkpoint.trust_pickles=true if you trust it"
            )
        for n in names:
            if n.endswith(".pkl"):
                check_pickle(z.read(n), f"{where}:{n}")


def _may_be_unpickled(path: Path) -> bool:
    """A file some reader could unpickle: a pickle-ish name, a zip (torch's format) or pickle
    bytes at the start, whatever the name. Text (a README, JSON) and safetensors are not."""
    name = path.name
    if name in PLAIN_NAMES or name.endswith(NOT_PICKLES) or name.endswith(DCP_SHARD):
        return False  # .distcp shards are checked through their folder's metadata
    if path.suffix in PICKLE_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


def check_file(path: Path) -> None:
    """One file of a checkpoint: skipped when no reader unpickles it, else checked."""
    if not _may_be_unpickled(path):
        return
    if zipfile.is_zipfile(path):
        try:
            _check_zip(path, str(path))
        except zipfile.BadZipFile as exc:
            raise CheckpointError(f"{path}: unreadable checkpoint file ({exc})") from None
        return
    data = path.read_bytes()
    end = check_pickle(data, str(path))
    if end != len(data):  # e.g. torch's legacy format: more pickles follow, unchecked
        raise UnsafeCheckpointError(
            f"{path}: not a format a checkpoint uses ({len(data) - end} "
            "bytes after the first pickle)"
        )


def check_dcp_folder(folder: Path) -> None:
    """A DCP folder: ``.metadata`` is checked, then every non-tensor entry it points to."""
    meta_path = folder / DCP_METADATA
    data = meta_path.read_bytes()
    end = check_pickle(data, str(meta_path))
    if end != len(data):
        raise UnsafeCheckpointError(f"{meta_path}: not a format a checkpoint uses")
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    # the very bytes just checked (names only DCP's own records), not a second read of the file
    metadata = pickle.loads(data)
    storage = getattr(metadata, "storage_data", None) or {}
    for index, info in storage.items():
        entry = metadata.state_dict_metadata.get(index.fqn)
        if not isinstance(entry, BytesStorageMetadata):
            continue  # tensors are read with weights_only=True
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(
                f"{folder / info.relative_path}: entry {index.fqn} is "
                "stored transformed; it cannot be checked"
            )
        shard = folder / info.relative_path
        with open(shard, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        where = f"{shard}[{index.fqn}]"
        try:
            _check_zip(io.BytesIO(blob), where)
        except zipfile.BadZipFile as exc:
            raise CheckpointError(f"{where}: unreadable entry ({exc})") from None


def verify_checkpoint(directory: Path, trust: bool = False) -> None:
    """Refuse a checkpoint folder any of whose pickles names a global outside :data:`ALLOWED`.

    Raises:
        UnsafeCheckpointError: naming the file and the global (exit 2 on the command line).
    """
    if trust:
        return
    directory = Path(directory)
    for path in sorted(directory.rglob("*")):
        if not path.is_file():  # a symlink is checked where it points
            continue
        if path.name == DCP_METADATA:
            check_dcp_folder(path.parent)
        else:
            check_file(path)
