"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

Every rank writes its own shards under ``<step dir>/dcp/``; the keys are fully qualified
parameter names, so a checkpoint written by N ranks loads into M ranks (or one process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from src.core.checkpoint import DCP_DIR
from src.core.errors import CheckpointError, CheckpointMismatchError


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a failed DCP read raises: its CheckpointException derives from BaseException."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return CheckpointError(
        f"{path}: unreadable sharded checkpoint ({type(exc).__name__}: {first[:200]})"
    )


def has_dcp(directory: Path) -> bool:
    return (Path(directory) / DCP_DIR / ".metadata").is_file()


def _optimizers(optimizer) -> list:
    """The torch optimizers behind ``optimizer`` (several behind a MultiOptimizer), for DCP."""
    if optimizer is None:
        return []
    return list(getattr(optimizer, "optimizers", [optimizer]))


def _state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, _optimizers(optimizer))
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optim_sd
    return state


def _copy(t):
    """A copy the training step can no longer change: host tensors are cloned; GPU tensors land
    in pinned host memory (asynchronously, on the current stream); DTensors keep their layout."""
    if not isinstance(t, torch.Tensor):
        return t
    if hasattr(t, "device_mesh"):  # a DTensor shard: copy the local part, keep the layout
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            _copy(t.to_local()),
            t.device_mesh,
            t.placements,
            run_check=False,
            shape=t.shape,
            stride=t.stride(),
        )
    if t.is_cuda:
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, pin_memory=True)
        return out.copy_(t.detach(), non_blocking=True)
    return t.detach().clone()


class BackgroundSave:
    """A checkpoint written by a thread: ``staged`` is set once the state is copied (the weights
    may change after that), ``future`` completes when the files are written."""

    def __init__(self, directory: Path, model, optimizer, process_group=None):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self.staged = threading.Event()
        # The state dict (references, no copy) is taken here: FSDP swaps a module's parameters
        # while it computes, so names and tensors must be read before the next step starts.
        state = _state(model, optimizer)
        # The copy must start after the work queued so far (the update) and on this rank's GPU:
        # a new thread's current device is GPU 0 whatever the rank.
        self._device: Optional[int] = None
        self._ready: Optional[torch.cuda.Event] = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._device = torch.cuda.current_device()
            self._ready = torch.cuda.Event()
            self._ready.record()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.future = self._pool.submit(self._run, directory, state, process_group)
        self._pool.shutdown(wait=False)

    def _run(self, directory, state, process_group) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.utils._pytree import tree_map

        try:
            if self._device is None or self._ready is None:
                state = tree_map(_copy, state)
            else:  # into pinned host memory on a side stream; done when its event completes
                torch.cuda.set_device(self._device)
                stream = torch.cuda.Stream()
                stream.wait_event(self._ready)
                with torch.cuda.stream(stream):
                    state = tree_map(_copy, state)
                stream.synchronize()
        finally:
            self.staged.set()
        dcp.save(state, checkpoint_id=str(Path(directory) / DCP_DIR), process_group=process_group)

    def wait_staged(self) -> None:
        """Block until the state is copied (a failed write is reported by ``result``, which
        every rank calls at the same point)."""
        self.staged.wait()

    def result(self) -> None:
        self.future.result()


def save_dcp(directory: Path, model, optimizer, async_save: bool = False, process_group=None):
    """Write model (and optimizer) shards. With ``async_save`` a thread copies the state and
    writes it while training goes on: a :class:`BackgroundSave` is returned (None when
    synchronous); the weights must not change before its ``wait_staged()``."""
    import torch.distributed.checkpoint as dcp

    if async_save:
        return BackgroundSave(directory, model, optimizer, process_group)
    dcp.save(_state(model, optimizer), checkpoint_id=str(Path(directory) / DCP_DIR))
    return None


def load_dcp(directory: Path, model, optimizer) -> None:
    """Load (and reshard) a DCP checkpoint into ``model`` and ``optimizer`` in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(directory) / DCP_DIR
    state = _state(model, optimizer)
    model_sd = state["model"]
    try:
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except _read_errors() as exc:
        raise _unreadable(path, exc) from None
    _check_keys(model_sd, saved, path)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except _read_errors() as exc:  # a missing or truncated shard surfaces here
        raise _unreadable(path, exc) from None
    set_state_dict(
        model,
        _optimizers(optimizer),
        model_state_dict=state["model"],
        optim_state_dict=state.get("optimizer", {}),
    )


def _check_keys(model_sd: dict, saved: dict, path: Path) -> None:
    bad, missing = [], []
    for k, v in model_sd.items():
        meta = saved.get(f"model.{k}")
        if meta is None:
            missing.append(k)
        elif hasattr(meta, "size") and tuple(meta.size) != tuple(v.shape):
            bad.append(f"{k} {tuple(meta.size)} vs model {tuple(v.shape)}")
    if bad or missing:
        parts = ([f"shape mismatch: {', '.join(bad[:10])}"] if bad else []) + (
            [f"missing: {', '.join(missing[:10])}"] if missing else []
        )
        raise CheckpointMismatchError(
            f"{path}: checkpoint does not fit the model; " + "; ".join(parts)
        )


def consolidated_model_state(directory: Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a DCP checkpoint, read in one process (for export)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        try:
            dcp_to_torch_save(str(Path(directory) / DCP_DIR), str(out))
        except _read_errors() as exc:
            raise _unreadable(Path(directory) / DCP_DIR, exc) from None
        state = torch.load(out, map_location="cpu", weights_only=True)
    return {k: v for k, v in state["model"].items() if isinstance(v, torch.Tensor)}
