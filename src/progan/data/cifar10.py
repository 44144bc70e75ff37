"""`data.source: cifar10`: the official CIFAR-10 archive, binary version -> one PNG per image in data/raw/cifar10-<split>/.

The archive is cifar-10-binary.tar.gz from the dataset's page (https://www.cs.toronto.edu/~kriz/cifar.html, "binary
version suitable for C programs"): no pickles, so nothing in it runs code when read. Its members
cifar-10-batches-bin/data_batch_1.bin ... data_batch_5.bin (the 50,000 training images, which the official
dataset_tool.py create_cifar10 reads from the python version's data_batch_1 ... 5) and test_batch.bin (10,000) hold
records of 3,073 bytes: 1 label byte (0..9), then the 32x32 image as 1,024 red, 1,024 green and 1,024 blue bytes,
rows top to bottom (the python version's `data` rows, which create_cifar10 reshapes to [3, 32, 32]).
`data.cifar10_split` picks train (create_cifar10's 50,000), test or all (train then test).

It is downloaded like any data.url (download.fetch: resumed after an interruption, checksum-checked before use):
`data.url` may name a mirror, null = the page's URL; `data.md5` / `data.sha256` its checksum, null = the published
md5. Only the named members are read, straight from the tar (nothing else is extracted); every record is checked
(label 0..9, whole records: a member cut short is one error line naming it) before anything is written. The images
are written as lossless PNGs numbered in archive order (batch, record) into a temp folder renamed into place, with a
stamp naming the archive: a re-run with the same archive and split writes nothing. The labels are not used (the
paper's CIFAR-10 result is unconditional: Theano config.py@2609d1f L173 max_labels=0).
"""
from __future__ import annotations

import io
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from progan import paths
from progan.data import archive as archive_mod, download
from progan.data.transfer import read_state
from progan.errors import ProganError
from progan.fileio import write_json
from progan.log import log, progress

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"        # published beside the URL (170,052,171 bytes)
MEMBER_DIR = "cifar-10-batches-bin"
SIZE_PX = 32
RECORD_BYTES = 1 + 3 * SIZE_PX * SIZE_PX      # label byte + R, G, B planes
NUM_LABELS = 10
SPLITS = {"train": tuple(f"data_batch_{k}.bin" for k in range(1, 6)),   # create_cifar10: data_batch_1 .. 5
          "test": ("test_batch.bin",)}
SPLITS["all"] = SPLITS["train"] + SPLITS["test"]
STAMP = ".progan-cifar10.json"


def out_dir(root: Path, split: str) -> Path:
    return root / paths.RAW_DIR / f"cifar10-{split}"


def images(data, root: Path) -> list[Path]:
    """Download (or reuse) the archive of `data` (params.data) and write its split's images; returns the PNGs."""
    url = data.url or URL
    archive = root / download.DOWNLOADS_DIR / download.file_name(url)
    download.fetch(url, archive, checksums=download._checksums(data) or {"md5": MD5},
                   max_bytes=int(data.max_download_mb * 2**20))
    return export(archive, out_dir(root, data.cifar10_split), data.cifar10_split)


def read_split(archive: str | os.PathLike, split: str):
    """Yield uint8 [n, 32, 32, 3] per member of the split, in archive order; ProganError naming the archive and member
    for a missing member, a record cut short, or a label outside 0..9 (each member is checked whole before it is
    yielded)."""
    archive = Path(archive)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for name in SPLITS[split]:
                yield _records(tar, archive, name)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as e:
        raise ProganError(f"{archive}: not a readable tar.gz archive ({e}); delete it and run `progan download` again "
                          f"to fetch it anew") from None


def _records(tar: tarfile.TarFile, archive: Path, name: str) -> np.ndarray:
    member = f"{MEMBER_DIR}/{name}"
    try:
        info = tar.getmember(member)
    except KeyError:
        raise ProganError(f"{archive}: no member {member}; is it the CIFAR-10 binary version (cifar-10-binary.tar.gz)? "
                          f"check data.url") from None
    if not info.isreg():
        raise ProganError(f"{archive}: member {member} is not a regular file; check data.url")
    raw = tar.extractfile(info).read()
    if len(raw) != info.size or not raw or len(raw) % RECORD_BYTES:
        raise ProganError(f"{archive}: member {member} is {len(raw)} bytes, not a whole number of {RECORD_BYTES}-byte "
                          f"records (a truncated record); delete the archive and run `progan download` again")
    records = np.frombuffer(raw, np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0]
    if labels.max() >= NUM_LABELS:
        bad = int(np.argmax(labels >= NUM_LABELS))
        raise ProganError(f"{archive}: member {member} record {bad} has label {labels[bad]} (CIFAR-10 labels are 0..9): "
                          f"not a CIFAR-10 batch; check data.url")
    return records[:, 1:].reshape(-1, 3, SIZE_PX, SIZE_PX).transpose(0, 2, 3, 1)    # CHW planes -> HWC


def _stamp(archive: Path, split: str) -> dict:
    st = archive.stat()
    return {"archive": archive.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "split": split}


def export(archive: str | os.PathLike, dest: str | os.PathLike, split: str) -> list[Path]:
    """The split's images as dest/<k:06d>.png (k in archive order), written once per archive; returns them sorted."""
    archive, dest = Path(archive), Path(dest)
    stamp = _stamp(archive, split)
    if read_state(dest / STAMP) == stamp:
        log.info("%s already exported into %s", archive.name, dest)
        return sorted(dest.glob("*.png"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    k = 0
    try:
        with progress(desc=f"cifar10 {split}", unit="img") as bar:
            for block in read_split(archive, split):           # one member (10,000 images) in memory at a time
                for image in block:
                    buf = io.BytesIO()
                    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
                    (tmp / f"{k:06d}.png").write_bytes(buf.getvalue())
                    k += 1
                bar.update(len(block))
        write_json(tmp / STAMP, stamp)
        tmp.chmod(0o755)                                        # mkdtemp makes it 0700
        archive_mod._replace_dir(tmp, dest)                     # the old export stays until the new one is whole
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cifar10: wrote %d %s images (%d px PNG) from %s into %s", k, split, SIZE_PX, archive.name, dest)
    return sorted(dest.glob("*.png"))
