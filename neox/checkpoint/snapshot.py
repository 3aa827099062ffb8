"""Copies of a state tree in host memory, taken before an asynchronous save returns to training.

`snapshot(tree, memory)` rebuilds `tree` (dicts, lists, tuples, tensors, plain values) with every
tensor moved into host memory. Each tensor storage is copied whole and once, and the tensors are
rebuilt as views of the copies: `torch.save` of the snapshot writes the same storages, so the same
bytes, as `torch.save` of the live tree would have.

Host memory comes from `HostMemory`, an arena reused from one save to the next (a run's saves have the
same tensors each time, so after the first save no memory is allocated). On CUDA it is pinned with
`cudaHostRegister` at its exact size (torch's pinned allocator rounds blocks up to a power of two, which
could double a large checkpoint's host memory), and the device->host copies are queued on the current
stream: training's next kernels run after them, in stream order, so the saved values are the ones of
this step. On CPU it is plain memory and the copies are done at once.
"""
from __future__ import annotations

import copy
import numbers
from typing import Any, Callable, Dict, List, Optional

import torch

from neox.config.resources import available_ram_bytes, local_ranks

_ALIGN = 64  # bytes: every copy starts on a cache line
_CHUNK = 256 << 20  # the smallest arena chunk; a larger storage gets a chunk of its own size
_RESERVE = 2 << 30  # host memory left to everything else when the arena grows


class HostMemoryShort(Exception):
    """The host cannot give a snapshot the memory it needs (one line saying how much is missing)."""


class SnapshotUnsupported(Exception):
    """The tree holds something this copy cannot rebuild faithfully (e.g. a tensor subclass)."""


def mem_available() -> Optional[int]:
    """This rank's share of the host memory its container can still take (the node's ranks all snapshot
    at the same moment, so each may use 1/local_ranks of it); None where unknown."""
    avail = available_ram_bytes()
    return None if avail is None else avail // local_ranks()


class HostMemory:
    """An arena of host buffers for snapshots: `take(n)` carves n bytes (a tensor whose storage is exactly
    those bytes), `reset()` makes the whole arena free again once a save's files are written."""

    def __init__(self, pinned: bool, available: Callable[[], Optional[int]] = mem_available):
        self.pinned = pinned
        self.available = available
        self.chunks: List[torch.Tensor] = []  # uint8, one storage each
        self._views: List[memoryview] = []
        self._chunk, self._offset = 0, 0

    @property
    def allocated(self) -> int:
        return sum(c.numel() for c in self.chunks)

    def take(self, nbytes: int) -> torch.Tensor:
        """n bytes of host memory, as a uint8 tensor whose storage holds exactly those bytes."""
        if nbytes == 0:  # nothing to hold: never grow the arena for it
            return torch.empty(0, dtype=torch.uint8)
        while self._chunk < len(self.chunks):
            room = self.chunks[self._chunk].numel() - self._offset
            if nbytes <= room:
                break
            self._chunk, self._offset = self._chunk + 1, 0
        else:
            self._grow(max(nbytes, _CHUNK))
        start = self._offset
        self._offset = -(-(start + nbytes) // _ALIGN) * _ALIGN
        # a storage of its own over these bytes, so torch.save writes them and nothing else of the chunk
        return torch.frombuffer(self._views[self._chunk][start:start + nbytes], dtype=torch.uint8)

    def reserve(self, nbytes: int) -> None:
        """Grow the arena to at least `nbytes` now (one chunk), so that a save of that much takes no memory
        of its own: the allocation and pinning (seconds for a large model) happen before the first save."""
        missing = nbytes - self.allocated
        if missing > 0:
            self._grow(max(missing, _CHUNK))
            self._chunk, self._offset = 0, 0  # fill from the start, as a reset arena does

    def reset(self) -> None:
        self._chunk, self._offset = 0, 0

    def _grow(self, nbytes: int) -> None:
        avail = self.available()
        if avail is not None and nbytes > avail - _RESERVE:
            raise HostMemoryShort(f"{nbytes / 2**30:.1f} GiB more host memory needed (after "
                                  f"{self.allocated / 2**30:.1f} GiB), {max(avail, 0) / 2**30:.1f} GiB available")
        try:
            chunk = torch.empty(nbytes, dtype=torch.uint8)
            if self.pinned:
                _pin(chunk)
        except (RuntimeError, MemoryError) as exc:
            cause = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            raise HostMemoryShort(f"{'pinning' if self.pinned else 'allocating'} {nbytes / 2**30:.1f} GiB of host "
                                  f"memory failed ({cause})") from None
        self.chunks.append(chunk)
        self._views.append(memoryview(chunk.numpy()))
        self._chunk, self._offset = len(self.chunks) - 1, 0

    def close(self) -> None:
        """Give the memory back (unpinned first: freeing registered memory is undefined)."""
        if self.pinned:
            for chunk in self.chunks:
                torch.cuda.cudart().cudaHostUnregister(chunk.data_ptr())
        self.chunks, self._views = [], []
        self.reset()


def _pin(chunk: torch.Tensor) -> None:
    # 1 = cudaHostRegisterPortable: pinned for every CUDA context of the process, not only the current one
    err = int(torch.cuda.cudart().cudaHostRegister(chunk.data_ptr(), chunk.numel(), 1))
    if err != 0:
        raise RuntimeError(f"cudaHostRegister returned cudaError {err}")


_PLAIN = (str, bytes, bool, numbers.Number, type(None), torch.dtype, torch.device, torch.Size, type)


def snapshot(tree: Any, memory: HostMemory) -> Any:
    """`tree` with every tensor in host memory (see the module docstring). Raises HostMemoryShort or
    SnapshotUnsupported; nothing of `tree` is changed either way."""
    copies: Dict[int, torch.Tensor] = {}  # a source storage (as torch.save tells them apart) -> its host copy

    def tensor(t: torch.Tensor) -> torch.Tensor:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or t.is_meta:
            raise SnapshotUnsupported(f"a {type(t).__name__} ({t.layout}) tensor")
        storage = t.untyped_storage()
        key = storage._cdata  # torch.save's own key: views of one storage share it
        host = copies.get(key)
        if host is None:
            host = memory.take(storage.nbytes())
            if storage.nbytes():
                src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
                host.copy_(src, non_blocking=memory.pinned and t.device.type == "cuda")
            copies[key] = host
        out = torch.empty(0, dtype=t.dtype).set_(host.untyped_storage(), t.storage_offset(), t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            return torch.nn.Parameter(out, requires_grad=t.requires_grad)
        return out.requires_grad_(t.requires_grad) if t.requires_grad else out

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return tensor(x)
        if isinstance(x, _PLAIN):
            return x
        if isinstance(x, dict):
            out = copy.copy(x)  # keeps the type and attributes (an OrderedDict's _metadata, a default factory)
            for k in out:
                out[k] = walk(x[k])
            return out
        if isinstance(x, list):
            out = copy.copy(x)
            out[:] = [walk(v) for v in x]
            return out
        if isinstance(x, tuple):
            items = [walk(v) for v in x]
            return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
        try:  # anything else is pickled as it is now, not as it will be when the writer gets to it
            return copy.deepcopy(x)
        except Exception as exc:  # noqa: BLE001 - whatever deepcopy refuses is written synchronously
            raise SnapshotUnsupported(f"a {type(x).__name__} that cannot be copied ({exc})") from None

    return walk(tree)
