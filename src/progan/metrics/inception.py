"""The Inception network of FID, KID and IS: torch-fidelity's port of the TF graph, its weights pinned by sha256.

The reference numbers (TTUR's fid.py, the official ProGAN `metrics/frechet_inception_distance.py` and
`metrics/inception_score.py`, Binkowski's KID) all run the TensorFlow graph `inception-2015-12-05`
(classify_image_graph_def.pb): uint8 images of any size, resized to 299 x 299 bilinearly *inside* the graph,
pool_3 features (2048) and, for IS, `pool_3 @ softmax/logits/MatMul`'s weight (1008 logits, no bias).
torch-fidelity's `FeatureExtractorInceptionV3` rebuilds exactly that graph in PyTorch, down to the TF1 bilinear
resize (`interpolate_bilinear_2d_like_tensorflow1x`) and its quirks, with the TF weights converted once and
published as a .pth; its own tests compare with the TF graph. Features `2048` and `logits_unbiased` are the
two tensors above.

Weights: one file (WEIGHTS), looked up in this order and never downloaded twice:
  1. `evaluate.inception_weights: PATH` (machines without internet): that file or a one-line error;
  2. the cache folder: $PROGAN_CACHE_DIR, else `evaluate.fid.cache_dir`, else $XDG_CACHE_HOME/progan
     (~/.cache/progan);
  3. torch.hub's checkpoints folder (where torch-fidelity itself keeps it), if a copy is already there;
  4. fetched once from WEIGHTS.url (or a mirror: $PROGAN_INCEPTION_URL, same bytes) into the cache folder
     (locked, streamed to a temp file, hashed, renamed).
Every file is hashed before anything reads it: the .pth is a pickle, and loading a pickle runs code, so the
bytes that were hashed are the bytes handed to torch.load (no second open of the path).
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from progan.errors import ProganError
from progan.fileio import atomic_path
from progan.log import log, progress

FEATURE_DIM = 2048                  # pool_3
LOGITS_DIM = 1008                   # the graph's classifier (1000 ImageNet classes + 8 unused)
FEATURES = ("2048", "logits_unbiased")
EXTRACTOR_NAME = "inception-v3-compat"   # torch-fidelity's registry name of this network
CACHE_ENV = "PROGAN_CACHE_DIR"
URL_ENV = "PROGAN_INCEPTION_URL"     # a mirror of WEIGHTS.url (the sha256 pin still applies)
FETCH_TIMEOUT_S = 60


@dataclass(frozen=True)
class WeightsFile:
    name: str
    url: str
    sha256: str
    size_bytes: int


# torch-fidelity 0.4.0 feature_extractor_inceptionv3.py URL_INCEPTION_V3 (a test checks it is the library's).
# The file name carries the first 8 hex digits of the sha256 (torch.hub's convention); the full digest and
# the size are pinned here so that a truncated or swapped file is never unpickled.
WEIGHTS = WeightsFile(
    name="weights-inception-2015-12-05-6726825d.pth",
    url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    size_bytes=95_628_359,
)


class WeightsUnavailable(ProganError):
    """The weights file is missing and cannot be fetched, or a file is there but is not the pinned one.
    The message is one line: which file, where to put it, how to get it."""


def cache_dir(configured: str | None = None) -> Path:
    """$PROGAN_CACHE_DIR, else `evaluate.fid.cache_dir`, else $XDG_CACHE_HOME/progan (~/.cache/progan)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "progan"


def weights_url(weights: WeightsFile | None = None) -> str:
    """Where the weights are fetched from: $PROGAN_INCEPTION_URL (a mirror) or the pinned URL."""
    return os.environ.get(URL_ENV) or (weights or WEIGHTS).url


def _how_to_get(weights: WeightsFile) -> str:
    return f"download {weights_url(weights)} (sha256 {weights.sha256})"


def _refused(path: Path, got: str, weights: WeightsFile, fix: str) -> WeightsUnavailable:
    return WeightsUnavailable(f"{path}: refused: sha256 {got} is not the pinned Inception weights {weights.name} "
                              f"(sha256 {weights.sha256}); nothing was loaded from it; {fix}")


def verified_bytes(path: Path, weights: WeightsFile | None = None, fix: str = "") -> bytes:
    """The file's bytes if their sha256 is the pinned one, else a one-line WeightsUnavailable (nothing parsed)."""
    weights = weights or WEIGHTS
    fix = fix or f"replace it with a fresh copy ({_how_to_get(weights)})"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WeightsUnavailable(f"{path}: cannot read the Inception weights ({e.strerror}); {fix}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != weights.sha256:
        raise _refused(path, got, weights, fix)
    return data


def fetch(dest: Path, weights: WeightsFile | None = None) -> None:
    """Download weights.url to `dest` (atomically; hashed while streaming; a wrong file is never kept)."""
    weights = weights or WEIGHTS
    missing = (f"Inception weights for fid/kid/is: {dest} is missing and cannot be fetched ({{why}}); "
               f"{_how_to_get(weights)} to that path, or set evaluate.inception_weights: PATH to a copy")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsUnavailable(missing.format(why=f"cannot create {dest.parent}: {e.strerror}")) from None
    url = weights_url(weights)
    log.info("inception: fetching %s (%.0f MB) into %s", url, weights.size_bytes / 1e6, dest.parent)
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response, atomic_path(dest) as tmp, \
                open(tmp, "wb") as out, progress(total=weights.size_bytes, desc="inception weights", unit="B",
                                                 unit_scale=True) as bar:
            for block in iter(lambda: response.read(1 << 20), b""):
                h.update(block)
                out.write(block)
                bar.update(len(block))
            out.flush()
            if h.hexdigest() != weights.sha256:
                raise WeightsUnavailable(f"{url}: the download's sha256 {h.hexdigest()} is not the pinned "
                                         f"{weights.sha256}; nothing was kept or loaded; {_how_to_get(weights)} "
                                         f"by hand to {dest}")
    except WeightsUnavailable:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:    # offline, DNS, HTTP 404, timeout, refused
        why = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise WeightsUnavailable(missing.format(why=" ".join(str(why).split()))) from None


def weights_bytes(explicit: str | None = None, configured_cache: str | None = None,
                  weights: WeightsFile | None = None) -> tuple[bytes, str]:
    """(verified bytes of the weights file, where they came from); see the module docstring for the order."""
    weights = weights or WEIGHTS
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(f"evaluate.inception_weights: {path}: no such file; {_how_to_get(weights)} "
                                     f"to that path, or set evaluate.inception_weights: null to fetch it into "
                                     f"{cache_dir(configured_cache)}")
        return verified_bytes(path, weights, f"put the right file there ({_how_to_get(weights)})"), str(path)
    folder = cache_dir(configured_cache)
    dest = folder / weights.name
    delete = f"delete it (it is fetched again) or {_how_to_get(weights)} to that path"
    if not dest.is_file():
        hub = _torch_hub_copy(weights)
        if hub is not None:
            return verified_bytes(hub, weights, delete), str(hub)
        _fetch_once(dest, weights)
    return verified_bytes(dest, weights, delete), str(dest)


def _fetch_once(dest: Path, weights: WeightsFile) -> None:
    """fetch() under an exclusive flock beside the cache file: parallel evaluate jobs download once, the others
    wait and reuse it. A folder that cannot be created or locked goes straight to fetch() (its one-line error)."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock = open(dest.parent / f".{dest.name}.lock", "w")
    except OSError:
        fetch(dest, weights)
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dest.is_file():       # another job may have fetched it while this one waited
            fetch(dest, weights)


def _torch_hub_copy(weights: WeightsFile) -> Path | None:
    try:
        import torch.hub

        path = Path(torch.hub.get_dir()) / "checkpoints" / weights.name
    except Exception:  # noqa: BLE001 - an unusual TORCH_HOME: just not used
        return None
    return path if path.is_file() else None


def network_from_bytes(data: bytes, device):
    """torch-fidelity's FeatureExtractorInceptionV3 (features 2048 and logits_unbiased) on `device`, eval mode.

    `data` must already be verified: the library unpickles it with torch.load(weights_only=False)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3(EXTRACTOR_NAME, list(FEATURES), feature_extractor_weights_path=io.BytesIO(data))
    return net.to(device).eval()


def load_network(device, explicit: str | None = None, configured_cache: str | None = None):
    """(the network, where its weights came from); WeightsUnavailable (one line) when they cannot be had."""
    data, source = weights_bytes(explicit, configured_cache)
    log.info("inception: weights %s (sha256 %s... verified)", source, WEIGHTS.sha256[:12])
    return network_from_bytes(data, device), source
