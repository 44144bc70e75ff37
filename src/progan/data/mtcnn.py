"""MTCNN face detector (Zhang et al. 2016, "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks") in PyTorch, batched over many images per call.

A port of the `mtcnn` pip package 1.0.0 (ipazc/mtcnn, MIT): the same P/R/O-Net weights, read straight from
the package's wheel with joblib (no TensorFlow import), and the same cascade, step for step; each step names
the package file it mirrors (`stages/stage_pnet.py`, `utils/bboxes.py`, ...). Its quirks are kept on purpose
so that both find the same faces: the scale count, "fast" NMS (a box suppressed by a higher one still
suppresses lower ones), the +1 box widths, TF's `crop_and_resize` sampling (box edges scaled by (H-1)/H).

Deviations, all invisible for one image per call:
- The package pads a batch of differently sized images into one tensor (results then depend on the batch).
  Here images are bucketed by size (no padding) and sorting / NMS run per image, so an image's faces do not
  depend on what else is in the batch. R-Net and O-Net still see the crops of every image in one batch.
- P-Net scales whose resized image is smaller than 12 px are skipped (the package errors and finds nothing).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import joblib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from progan import gpus
from progan.errors import ProganError

PNET_CELL_PX = 12        # P-Net's receptive field (package: generate_bounding_box cell_size)
PNET_STRIDE_PX = 2
THRESHOLDS = (0.6, 0.7, 0.8)  # package defaults: threshold_pnet, threshold_rnet, threshold_onet
SCALE_FACTOR = 0.709     # package default scale_factor
RNET_CHUNK = 2048        # crops per R-Net forward
ONET_CHUNK = 512         # crops per O-Net forward
NMS_BLOCK_ENTRIES = 1 << 22  # IoU entries per NMS block (bounds memory for images with many proposals)


@dataclass(eq=False)
class Face:
    """One detection in image pixels. landmarks [5, 2] (x, y): eye, eye, nose, mouth corner, mouth corner,
    in the package's order (left_eye, right_eye, nose, mouth_left, mouth_right)."""
    box: tuple[float, float, float, float]   # x0, y0, x1, y1
    score: float
    landmarks: np.ndarray

    @property
    def area_px(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


# ---------------------------------------------------------------- networks (package: network/{p,r,o}net.py)

def _pool_same(x: torch.Tensor, k: int) -> torch.Tensor:
    # Keras MaxPooling2D(padding="same", strides=2) pads only at the end: ceil_mode does the same.
    return F.max_pool2d(x, k, 2, ceil_mode=True)


def _flatten_keras(x: torch.Tensor) -> torch.Tensor:
    # Keras: Permute((2, 1, 3)) then Flatten on [N, H, W, C] -> order W, H, C. Here x is [N, C, H, W].
    return x.permute(0, 3, 2, 1).flatten(1)


class PNet(nn.Module):
    """Proposal net, fully convolutional: [N, 3, H, W] -> box offsets [N, 4, h, w], face prob [N, 2, h, w]."""

    keras_layers = ("conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "conv4_1", "conv4_2")

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 4, 1)   # box regression
        self.conv4_2 = nn.Conv2d(32, 2, 1)   # face / not face

    def forward(self, x):
        x = _pool_same(self.prelu1(self.conv1(x)), 2)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_1(x), F.softmax(self.conv4_2(x), dim=1)


class RNet(nn.Module):
    """Refine net: [N, 3, 24, 24] -> box offsets [N, 4], face prob [N, 2]."""

    keras_layers = ("conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "fc4", "prelu4", "fc5_1", "fc5_2")

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.fc4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.fc5_1, self.fc5_2 = nn.Linear(128, 4), nn.Linear(128, 2)

    def forward(self, x):
        x = _pool_same(self.prelu1(self.conv1(x)), 3)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)          # padding="valid"
        x = self.prelu4(self.fc4(_flatten_keras(self.prelu3(self.conv3(x)))))
        return self.fc5_1(x), F.softmax(self.fc5_2(x), dim=1)


class ONet(nn.Module):
    """Output net: [N, 3, 48, 48] -> box offsets [N, 4], landmarks [N, 10] (x1..x5, y1..y5), face prob [N, 2]."""

    keras_layers = ("conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "conv4", "prelu4",
                    "fc5", "prelu5", "fc6_1", "fc6_2", "fc6_3")

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.fc5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.fc6_1, self.fc6_2, self.fc6_3 = nn.Linear(256, 4), nn.Linear(256, 10), nn.Linear(256, 2)

    def forward(self, x):
        x = _pool_same(self.prelu1(self.conv1(x)), 3)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)          # padding="valid"
        x = _pool_same(self.prelu3(self.conv3(x)), 2)
        x = self.prelu5(self.fc5(_flatten_keras(self.prelu4(self.conv4(x)))))
        return self.fc6_1(x), self.fc6_2(x), F.softmax(self.fc6_3(x), dim=1)


def weights_dir() -> Path:
    """The `mtcnn` package's weight files, found without importing it (its __init__ imports TensorFlow)."""
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise ProganError("crop: the `mtcnn` package is not installed (its wheel ships the MTCNN weights); "
                          "pip install mtcnn")
    return Path(list(spec.submodule_search_locations)[0]) / "assets" / "weights"


def load_keras_weights(net: nn.Module, arrays: Sequence[np.ndarray]) -> nn.Module:
    """Copy Keras-layout arrays (in `net.keras_layers` order, as Keras get_weights() lists them) into `net`.
    Conv kernel HWIO -> OIHW; PReLU alpha (1, 1, C) or (C,) -> (C,); Dense (in, out) -> (out, in)."""
    it = iter(arrays)
    with torch.no_grad():
        for name in net.keras_layers:
            layer = getattr(net, name)
            if isinstance(layer, nn.PReLU):
                layer.weight.copy_(torch.from_numpy(np.asarray(next(it)).reshape(-1)))
            elif isinstance(layer, nn.Conv2d):
                layer.weight.copy_(torch.from_numpy(np.asarray(next(it)).transpose(3, 2, 0, 1)))
                layer.bias.copy_(torch.from_numpy(np.asarray(next(it))))
            else:
                layer.weight.copy_(torch.from_numpy(np.asarray(next(it)).T))
                layer.bias.copy_(torch.from_numpy(np.asarray(next(it))))
    if next(it, None) is not None:
        raise ProganError(f"crop: MTCNN weights for {type(net).__name__} have more arrays than its layers")
    return net.eval()


@lru_cache(maxsize=4)
def load_nets(device: str = "cpu") -> tuple[PNet, RNet, ONet]:
    nets = []
    for cls, name in ((PNet, "pnet"), (RNet, "rnet"), (ONet, "onet")):
        path = weights_dir() / f"{name}.lz4"
        try:
            arrays = joblib.load(path)
        except (OSError, EOFError, ValueError) as e:
            raise ProganError(f"{path}: cannot read MTCNN weights ({e}); reinstall the mtcnn package") from None
        net = load_keras_weights(cls(), arrays).requires_grad_(False)
        nets.append(net.to(device, memory_format=torch.channels_last))   # ~2.5x faster convs and pools on CPU
    return tuple(nets)


# ---------------------------------------------------------------- image ops matching TensorFlow's

@lru_cache(maxsize=256)
def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of TF's resize_area along one axis (resize_area_op.cc, align_corners=False):
    output cell y averages input over [y*s, (y+1)*s), s = n_in / n_out, partial pixels weighted by overlap."""
    s = np.float32(n_in) / np.float32(n_out)
    m = np.zeros((n_out, n_in), np.float64)
    for y in range(n_out):
        y0, y1 = np.float32(y) * s, np.float32(y + 1) * s
        for i in range(int(math.floor(y0)), int(math.ceil(y1))):
            w = min(i + 1, y1) - max(i, y0)
            m[y, min(i, n_in - 1)] += w
    return (m / s).astype(np.float32)


@lru_cache(maxsize=256)
def _area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The banded `_area_matrix` as K taps per output: indices [n_out, K] and weights [n_out, K]."""
    m = _area_matrix(n_in, n_out)
    nz = m != 0
    first = nz.argmax(axis=1)
    k = int((n_in - nz[:, ::-1].argmax(axis=1) - first).max())
    idx = np.minimum(first[:, None] + np.arange(k)[None], n_in - 1)
    w = np.take_along_axis(m, idx, axis=1) * (first[:, None] + np.arange(k)[None] < n_in)
    return idx.astype(np.int64), w.astype(np.float32)


def _resize_area_dim1(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """Area-resize dim 1 of [B, L, D]: a weighted sum of K gathers (K = 2..3 when the factor is < 2)."""
    idx, w = _area_taps(x.shape[1], n_out)
    idx_t, w_t = torch.from_numpy(idx).to(x.device), torch.from_numpy(w).to(x.device)
    out = x.index_select(1, idx_t[:, 0]).mul_(w_t[:, 0, None])
    for k in range(1, idx.shape[1]):
        out.addcmul_(x.index_select(1, idx_t[:, k]), w_t[:, k, None])
    return out


def resize_area(x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """[N, H, W, C] -> [N, h, w, C] like tf.image.resize(method=AREA): separable, a few taps per output pixel
    (O(H W) work, not the O(H W h) of dense matrix products)."""
    n, h, w, c = x.shape
    x = _resize_area_dim1(x.reshape(n, h, w * c), out_hw[0])                # rows
    x = _resize_area_dim1(x.reshape(n * out_hw[0], w, c), out_hw[1])        # columns
    return x.reshape(n, out_hw[0], out_hw[1], c)


def crop_and_resize(images: torch.Tensor, boxes_xyxy: np.ndarray, index: np.ndarray, size_px: int) -> torch.Tensor:
    """tf.image.crop_and_resize (bilinear, extrapolation 0) as the package calls it (utils/images.py
    extract_patches): pixel boxes are divided by (W, H) and TF maps them back with (W-1, H-1).
    images [N, H, W, C] -> crops [K, C, size, size] (channels_last memory)."""
    n, h, w, c = images.shape
    dev = images.device
    norm = torch.from_numpy((boxes_xyxy / np.array([w, h, w, h], np.float64)).astype(np.float32)).to(dev)
    x1, y1, x2, y2 = norm.unbind(1)
    steps = torch.arange(size_px, device=dev, dtype=torch.float32)
    in_y = (y1 * (h - 1))[:, None] + steps[None] * ((y2 - y1) * (h - 1) / (size_px - 1))[:, None]   # [K, S]
    in_x = (x1 * (w - 1))[:, None] + steps[None] * ((x2 - x1) * (w - 1) / (size_px - 1))[:, None]
    valid = ((in_y >= 0) & (in_y <= h - 1))[:, :, None] & ((in_x >= 0) & (in_x <= w - 1))[:, None, :]
    ty, tx = in_y.floor(), in_x.floor()
    ly, lx = (in_y - ty)[:, :, None, None], (in_x - tx)[:, None, :, None]
    base = torch.from_numpy(np.asarray(index, np.int64)).to(dev)[:, None] * (h * w)
    row0, row1 = base + ty.long().clamp(0, h - 1) * w, base + in_y.ceil().long().clamp(0, h - 1) * w
    col0, col1 = tx.long().clamp(0, w - 1), in_x.ceil().long().clamp(0, w - 1)
    pixels = images.reshape(-1, c)

    def gather(rows, cols):   # [K, S, S, C]
        return pixels.index_select(0, (rows[:, :, None] + cols[:, None, :]).reshape(-1)).view(len(base), size_px, size_px, c)

    top_left, top_right, bottom_left, bottom_right = gather(row0, col0), gather(row0, col1), gather(row1, col0), gather(row1, col1)
    top = top_left + (top_right - top_left) * lx
    bottom = bottom_left + (bottom_right - bottom_left) * lx
    out = (top + (bottom - top) * ly) * valid[..., None]
    return out.permute(0, 3, 1, 2)


# ---------------------------------------------------------------- box ops (package: utils/bboxes.py)
# Per image, rows are [x1, y1, x2, y2, score] in float64 (the package's columns 1..5).

def _sort_desc(b: np.ndarray) -> np.ndarray:
    return b[np.argsort(b[:, 4])[::-1]]   # bboxes.sort_by_scores(ascending=False)


def nms_fast(b: np.ndarray, threshold: float, method: str = "union") -> np.ndarray:
    """bboxes.smart_nms_from_bboxes for one image, rows already in score order: box j is dropped when any
    earlier box (suppressed or not) overlaps it by more than `threshold`. Areas have no +1, as there."""
    k = len(b)
    if k < 2:
        return b
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    drop = np.zeros(k, bool)
    block = max(1, NMS_BLOCK_ENTRIES // k)
    with np.errstate(divide="ignore", invalid="ignore"):
        for j0 in range(1, k, block):
            j1 = min(k, j0 + block)
            bi, bj = b[:j1, None, :4], b[None, j0:j1, :4]
            inter = (np.maximum(0, np.minimum(bi[..., 2], bj[..., 2]) - np.maximum(bi[..., 0], bj[..., 0]))
                     * np.maximum(0, np.minimum(bi[..., 3], bj[..., 3]) - np.maximum(bi[..., 1], bj[..., 1])))
            ai, aj = area[:j1, None], area[None, j0:j1]
            denom = ai + aj - inter if method == "union" else np.minimum(ai, aj)
            over = (inter / denom) > threshold
            over &= np.arange(j1)[:, None] < np.arange(j0, j1)[None, :]    # only earlier rows suppress
            drop[j0:j1] = over.any(axis=0)
    return b[~drop]


def _square(b: np.ndarray) -> np.ndarray:
    """bboxes.resize_to_square: grow the shorter side about the centre (no +1)."""
    b = b.copy()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = np.maximum(w, h)
    b[:, 0] += w * 0.5 - side * 0.5
    b[:, 1] += h * 0.5 - side * 0.5
    b[:, 2], b[:, 3] = b[:, 0] + side, b[:, 1] + side
    return b


def _regress(b: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """bboxes.adjust_bboxes: offsets are fractions of the (+1) box width / height."""
    b = b.copy()
    w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    b[:, :4] += offsets * np.stack([w, h, w, h], axis=1)
    return b


def pyramid_scales(h: int, w: int, min_face_px: int, factor: float = SCALE_FACTOR) -> list[float]:
    """utils/images.py build_scale_pyramid: first scale 12 / min_face_px, count from min(h, w) / 12."""
    count = round(-((np.log(min(h, w) / PNET_CELL_PX) / np.log(factor)) + 1))
    return list(PNET_CELL_PX / min_face_px * factor ** np.arange(max(0, count)))


# ---------------------------------------------------------------- the cascade

class MTCNN:
    """`MTCNN(min_face_px=20).detect(images)`: faces of many uint8 RGB images [H, W, 3] in one call."""

    def __init__(self, min_face_px: int = 20, device: str | torch.device | None = None,
                 thresholds: tuple[float, float, float] = THRESHOLDS, scale_factor: float = SCALE_FACTOR):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.min_face_px = int(min_face_px)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.scale_factor = float(scale_factor)
        self.pnet, self.rnet, self.onet = load_nets(str(self.device))

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        for i, im in enumerate(images):
            if not (isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3):
                raise ValueError(f"image {i}: expected a uint8 array [H, W, 3], got "
                                 f"{getattr(im, 'dtype', type(im).__name__)} {getattr(im, 'shape', '')}")
        with gpus.fp32_convolutions(self.device):   # TF32 would lose the 1e-5 agreement with the package
            return self._detect(images)

    def _detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            buckets.setdefault(im.shape[:2], []).append(i)
        # Normalised images [n, H, W, 3] per bucket: (x - 127.5) / 128 (utils/images.py normalize_images).
        tensors, where = [], {}
        boxes: list[np.ndarray] = [np.empty((0, 5))] * len(images)
        for bucket, idx in enumerate(buckets.values()):
            x = torch.from_numpy(np.stack([images[i] for i in idx])).to(self.device)
            x = (x.float() - 127.5) / 128
            tensors.append(x)
            for j, i in enumerate(idx):
                where[i] = (bucket, j)
            for i, b in zip(idx, self._stage_pnet(x)):
                boxes[i] = b
        boxes = self._stage_refine(tensors, where, boxes, 24)
        return self._stage_output(tensors, where, boxes, [im.shape[:2] for im in images])

    def _stage_pnet(self, x: torch.Tensor) -> list[np.ndarray]:
        """stages/stage_pnet.py for one bucket of same-size normalised images x [n, H, W, 3]."""
        n, h, w, _ = x.shape
        per_scale: list[list[np.ndarray]] = [[] for _ in range(n)]
        for scale in pyramid_scales(h, w, self.min_face_px, self.scale_factor):
            hs, ws = int(h * scale), int(w * scale)   # tf.image.resize truncates a float size
            if min(hs, ws) < PNET_CELL_PX:
                continue
            reg, prob = self.pnet(resize_area(x, (hs, ws)).permute(0, 3, 1, 2))   # channels_last view
            reg, prob = reg.cpu().numpy(), prob[:, 1].cpu().numpy()
            for i in range(n):
                ys, xs = np.nonzero(prob[i] > self.thresholds[0])   # bboxes.generate_bounding_box
                r = reg[i][:, ys, xs].astype(np.float64)
                cell = PNET_CELL_PX - 1
                b = np.stack([PNET_STRIDE_PX * xs + 1 + r[0] * cell, PNET_STRIDE_PX * ys + 1 + r[1] * cell,
                              PNET_STRIDE_PX * xs + PNET_CELL_PX + r[2] * cell,
                              PNET_STRIDE_PX * ys + PNET_CELL_PX + r[3] * cell,
                              prob[i][ys, xs].astype(np.float64)], axis=1)
                b = _sort_desc(b)
                b[:, :4] /= scale                                      # bboxes.upscale_bboxes
                per_scale[i].append(nms_fast(b, 0.5))
        out = []
        for parts in per_scale:
            b = np.concatenate(parts) if parts else np.empty((0, 5))
            out.append(_square(nms_fast(_sort_desc(b), 0.7)))
        return out

    def _crops(self, tensors, where, boxes, size_px) -> torch.Tensor:
        """Crops of every image's boxes, all buckets in one batch [K, 3, S, S], in image then box order."""
        parts, owners = [], []
        by_bucket: dict[int, list[int]] = {}
        for i, b in enumerate(boxes):
            if len(b):
                by_bucket.setdefault(where[i][0], []).append(i)
        for bucket, idx in by_bucket.items():
            bx = np.concatenate([boxes[i][:, :4] for i in idx])
            sub = np.concatenate([np.full(len(boxes[i]), where[i][1]) for i in idx])
            parts.append(crop_and_resize(tensors[bucket], bx, sub, size_px))
            owners += [i for i in idx for _ in range(len(boxes[i]))]
        if not parts:
            return torch.empty((0, 3, size_px, size_px), device=self.device)
        order = torch.from_numpy(np.argsort(np.asarray(owners), kind="stable")).to(self.device)
        return torch.cat(parts)[order]

    def _run(self, net, crops: torch.Tensor, chunk: int) -> list[np.ndarray]:
        outs = [net(crops[k:k + chunk]) for k in range(0, len(crops), chunk)]
        return [torch.cat(o).cpu().numpy() for o in zip(*outs)]

    def _stage_refine(self, tensors, where, boxes, size_px) -> list[np.ndarray]:
        """stages/stage_rnet.py: rescore and regress every P-Net box, threshold, NMS, square."""
        crops = self._crops(tensors, where, boxes, size_px)
        if not len(crops):
            return [np.empty((0, 5)) for _ in boxes]
        offsets, prob = self._run(self.rnet, crops, RNET_CHUNK)
        out, k = [], 0
        for b in boxes:
            n = len(b)
            if n == 0:
                out.append(b)
                continue
            b = b.copy()
            b[:, 4] = prob[k:k + n, 1]                             # bboxes.replace_confidence
            b = _regress(b, offsets[k:k + n])
            b = b[b[:, 4] > self.thresholds[1]]                    # bboxes.pick_matches
            out.append(_square(nms_fast(_sort_desc(b), 0.7)))
            k += n
        return out

    def _stage_output(self, tensors, where, boxes, shapes) -> list[list[Face]]:
        """stages/stage_onet.py + the package's postprocess (limit_bboxes: boxes clipped, landmarks not)."""
        crops = self._crops(tensors, where, boxes, 48)
        if not len(crops):
            return [[] for _ in boxes]
        offsets, marks, prob = self._run(self.onet, crops, ONET_CHUNK)
        faces, k = [], 0
        for b, (h, w) in zip(boxes, shapes):
            n = len(b)
            if n == 0:
                faces.append([])
                continue
            bw, bh = b[:, 2:3] - b[:, 0:1] + 1, b[:, 3:4] - b[:, 1:2] + 1      # landmarks.adjust_landmarks
            lm = np.concatenate([bw * marks[k:k + n, :5] + b[:, 0:1] - 1, bh * marks[k:k + n, 5:] + b[:, 1:2] - 1], 1)
            b = b.copy()
            b[:, 4] = prob[k:k + n, 1]
            b = np.concatenate([_regress(b, offsets[k:k + n]), lm], axis=1)
            b = nms_fast(_sort_desc(b[b[:, 4] > self.thresholds[2]]), 0.7, method="min")
            b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, w - 1)
            b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, h - 1)
            faces.append([Face(box=tuple(float(v) for v in r[:4]), score=float(r[4]),
                               landmarks=np.stack([r[5:10], r[10:15]], axis=1)) for r in b])
            k += n
        return faces


def detect(images: Sequence[np.ndarray], min_face_px: int = 20, device: str | None = None) -> list[list[Face]]:
    """Faces of each uint8 RGB image [H, W, 3], most confident first (see MTCNN)."""
    return MTCNN(min_face_px=min_face_px, device=device).detect(images)
