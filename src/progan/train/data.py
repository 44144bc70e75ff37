"""Training images of one stage: the pyramid level `data/pyramid/<R>.npy` (uint8 [N, R, R, 3]) read by memmap.

The sampler is a pure function of (seed, res, cur_nimg): epoch e uses permutation
`default_rng([seed, R, 0, e])` of the N images and image position p = cur_nimg + i lies in epoch p // N,
so a resumed run draws exactly the batches an uninterrupted one would, with no state but cur_nimg.
Mirror flips (official `process_reals` MirrorAugment) come from `default_rng([seed, R, 1, cur_nimg])`.
Multi-GPU: every rank draws the same global batch and keeps rows rank::world (strided, so minibatch-stddev
groups, which are strided too in the official networks.py, match the single-process ones).
Batches cross to the device as uint8 and become float [-1, 1] NCHW there. With `train.data_on_device` the
whole level is copied to the device once (`resident_level`) and batches are gathered there: no host work
and no host-to-device copy per step (the same indices and flips, so the same batches).
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np
import torch

from progan import paths
from progan.errors import ProganError


def open_level(res_px: int) -> np.ndarray:
    """The memmapped level [N, R, R, 3] uint8; a ProganError naming the file if missing or malformed."""
    path = paths.pyramid_level(res_px)
    if not Path(path).is_file():
        raise ProganError(f"{path} not found: run `progan pyramid` first")
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise ProganError(f"{path}: not a readable .npy file ({e}); delete it and run `progan pyramid` again") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or tuple(arr.shape[1:]) != (res_px, res_px, 3):
        raise ProganError(f"{path}: expected uint8 [N, {res_px}, {res_px}, 3], got {arr.dtype} {list(arr.shape)}; "
                          f"run `progan pyramid` again")
    if arr.shape[0] == 0:
        raise ProganError(f"{path}: holds no images; check data/faces and run `progan pyramid` again")
    return arr


class Sampler:
    """Seeded, resumable choice of image indices and flips for the minibatch starting at `cur_nimg`."""

    def __init__(self, num_images: int, seed: int, res_px: int, mirror: bool):
        self.num_images, self.seed, self.res_px, self.mirror = int(num_images), int(seed), int(res_px), bool(mirror)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, self.res_px, 0, epoch]).permutation(self.num_images)
        return self._perms[epoch]

    def indices(self, cur_nimg: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(image indices int64 [batch], flip mask bool [batch]) of the global minibatch at cur_nimg."""
        pos = np.arange(cur_nimg, cur_nimg + batch, dtype=np.int64)
        epochs, offsets = np.divmod(pos, self.num_images)
        idx = np.empty(batch, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            idx[sel] = self._perm(int(e))[offsets[sel]]
        if self.mirror:
            flip = np.random.default_rng([self.seed, self.res_px, 1, cur_nimg]).random(batch) < 0.5
        else:
            flip = np.zeros(batch, dtype=bool)
        return idx, flip

    def state(self, cur_nimg: int) -> dict:
        """All the sampler needs to resume (it has no hidden RNG state)."""
        return {"seed": self.seed, "res_px": self.res_px, "num_images": self.num_images,
                "mirror": self.mirror, "cur_nimg": int(cur_nimg)}


def read_batch(images: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Gather rows of the memmap in ascending order (sequential reads), returned in `idx` order."""
    order = np.argsort(idx, kind="stable")
    out = np.empty((len(idx),) + images.shape[1:], dtype=np.uint8)
    out[order] = images[idx[order]]
    return out


# train.data_on_device: auto keeps the level on a CUDA device when it takes at most this share of the memory
# free there before training starts (CelebA 30k images at 64 px: 0.37 GB; at 128 px 1.5 GB; at 256 px 5.9 GB).
DEVICE_DATA_FRACTION = 0.25


def keep_on_device(setting, level_bytes: int, device: torch.device, free_bytes: int | None = None) -> bool:
    """Whether to hold the pyramid level in `device` memory, for train.data_on_device `setting` (auto/true/false).

    auto: only on CUDA, and only when the level fits in DEVICE_DATA_FRACTION of the free memory (`free_bytes`,
    read from the device when None); true: always (on the CPU: a copy in RAM instead of the memmap).
    """
    if setting is True:
        return True
    if setting is False or device.type != "cuda":
        return False
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    return level_bytes <= DEVICE_DATA_FRACTION * free_bytes


def resident_level(images: np.ndarray, device: torch.device, chunk_bytes: int = 256 << 20) -> torch.Tensor:
    """The memmapped level copied to one uint8 tensor [N, R, R, 3] on `device`, in chunks (no second whole
    copy in host memory)."""
    out = torch.empty(images.shape, dtype=torch.uint8, device=device)
    rows = max(1, chunk_bytes // max(1, images[0].nbytes))
    for start in range(0, len(images), rows):
        if device.type == "cpu":
            out.numpy()[start:start + rows] = images[start:start + rows]
        else:       # a writable host copy of the chunk (the memmap is read-only), then to the device
            out[start:start + rows] = torch.from_numpy(np.array(images[start:start + rows]))
    return out


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (latents, indices) on `device` without a host sync: on CUDA a plain `.to(device)`
    from pageable memory is cudaMemcpyAsync + cudaStreamSynchronize (ATen memcpy_and_sync), which makes the
    host wait for every queued kernel each step; from pinned memory with non_blocking it is queued like a
    kernel (the pinned block is kept until the copy has run by torch's caching host allocator)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_device(batch_u8: torch.Tensor, flip: torch.Tensor, device: torch.device,
              channels_last: bool = False) -> torch.Tensor:
    """uint8 [N, R, R, 3] (host) -> float32 [N, 3, R, R] in [-1, 1] on `device`, flips applied there.

    Official process_reals: adjust_dynamic_range([0, 255] -> [-1, 1]) then MirrorAugment (reverse width).
    """
    x = batch_u8.to(device, non_blocking=True).permute(0, 3, 1, 2).float().mul_(2.0 / 255.0).sub_(1.0)
    if bool(flip.any()):                              # checked on the host tensor: no device sync
        f = host_to_device(flip, device)
        x = torch.where(f[:, None, None, None], x.flip(3), x)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return x


class Batches:
    """Iterate this rank's host minibatches from `start_nimg` up to `end_nimg`, optionally prefetched by a thread.

    Yields (cur_nimg, uint8 tensor [batch/world, R, R, 3], flip bool tensor [batch/world]). `images` is the
    memmap (batches gathered on the host) or a `resident_level` tensor (gathered on its device, no prefetch
    thread: the gather is one asynchronous kernel).
    """

    def __init__(self, images: np.ndarray, sampler: Sampler, batch: int, start_nimg: int, end_nimg: int,
                 rank: int = 0, world: int = 1, prefetch: int = 2, pin_memory: bool = False):
        if batch % world:
            raise ProganError(f"params.yaml: train.stages.{sampler.res_px}.batch {batch} must be divisible by "
                              f"the {world} GPUs")
        self.images, self.sampler, self.batch = images, sampler, batch
        self.start_nimg, self.end_nimg = start_nimg, end_nimg
        self.rank, self.world, self.prefetch, self.pin = rank, world, prefetch, pin_memory
        if isinstance(images, torch.Tensor):
            self.prefetch, self.pin = 0, False
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _make(self, cur_nimg: int):
        idx, flip = self.sampler.indices(cur_nimg, self.batch)
        idx, flip = idx[self.rank::self.world], flip[self.rank::self.world]
        if isinstance(self.images, torch.Tensor):
            return cur_nimg, self.images[host_to_device(torch.from_numpy(idx), self.images.device)], torch.from_numpy(flip)
        x = torch.from_numpy(read_batch(self.images, idx))
        if self.pin:
            x = x.pin_memory()
        return cur_nimg, x, torch.from_numpy(flip)

    def _steps(self):
        return range(self.start_nimg, self.end_nimg, self.batch)

    def _worker(self):
        try:
            for n in self._steps():
                item = self._make(n)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._queue.put(e)

    def __iter__(self):
        if self.prefetch <= 0:
            for n in self._steps():
                yield self._make(n)
            return
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._worker, name="progan-prefetch", daemon=True)
        self._thread.start()
        try:
            for _ in self._steps():
                item = self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
