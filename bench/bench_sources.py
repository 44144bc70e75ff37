"""Does training learn a non-face set that comes in through the new sources (issue #29)? On this CPU, 32 px.

There is no CIFAR-10 or LSUN here (and no internet), so the set is made honestly from what there is: the photos of
../shared/data/photos with no human face in them (photos.tsv true_faces_if_known 0: animals, a landscape, a
painting, ...), each resized to 256 px on its smaller side (as LSUN's exports are) and cut into 64x64 tiles at a
32 px stride: a few hundred tiles of animals, fur, sky, grass and paint. They are stored the way the official
exports store images, so that they take the real new code paths, not a folder:
  lsun     an LMDB database whose values are the encoded tiles (JPEG and WebP alternately, as the LSUN scenes and
           objects), read by `data.source: lsun` (data.folder), centre-cropped and resized to 32 px by
           `crop.detector: center` (create_lsun)
  cifar10  a cifar-10-binary.tar.gz of the tiles box-downscaled to 32 px, in the binary version's record layout,
           downloaded from a file:// URL with its md5 by `data.source: cifar10` and passed through unchanged by
           `crop.detector: none` (create_cifar10)
Then bench/bench_quality.py trains the demo's nets 4 -> 32 px on it with the official recipe (its `--set` puts the
source in place of its folder of faces) and records SWD x1e3 at 32 px at the end of every phase, beside the
real-vs-real floor: it learns when the SWD falls from the untrained net's towards the floor.

    .venv/bin/python bench/bench_sources.py --source lsun --kimg 4      # ~28 kimg, minutes of CPU
    .venv/bin/python bench/bench_sources.py --source cifar10 --kimg 4

Writes bench/out/sources/<source>/ (the set, and bench_quality's results.json, table.md, swd.png, samples).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "photos"
OUT = REPO / "bench" / "out" / "sources"
TILE_PX, STRIDE_PX, SHORT_SIDE_PX = 64, 32, 256


def no_face_photos() -> list[Path]:
    with open(PHOTOS.parent / "photos.tsv", newline="") as f:
        return [PHOTOS / r["file"] for r in csv.DictReader(f, delimiter="\t") if r["true_faces_if_known"] == "0"]


def tiles() -> list[Image.Image]:
    out = []
    for path in no_face_photos():
        im = Image.open(path).convert("RGB")
        scale = SHORT_SIDE_PX / min(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
        for y in range(0, im.height - TILE_PX + 1, STRIDE_PX):
            for x in range(0, im.width - TILE_PX + 1, STRIDE_PX):
                out.append(im.crop((x, y, x + TILE_PX, y + TILE_PX)))
    return out


def write_lmdb(images: list[Image.Image], folder: Path) -> None:
    import lmdb

    folder.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(folder), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for k, im in enumerate(images):
            buf = io.BytesIO()
            im.save(buf, format="WEBP" if k % 2 else "JPEG", quality=95)
            txn.put(hashlib.sha1(str(k).encode()).hexdigest().encode(), buf.getvalue())
    env.close()


def write_cifar_archive(images: list[Image.Image], path: Path) -> str:
    """The binary version's layout: per record a label byte (0 here) and the R, G, B planes; five training batches."""
    arrays = [np.asarray(im.resize((32, 32), Image.Resampling.BOX)) for im in images]
    batches = np.array_split(np.arange(len(arrays)), 5)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for k, idx in enumerate(batches, 1):
            data = b"".join(b"\0" + arrays[i].transpose(2, 0, 1).tobytes() for i in idx)
            info = tarfile.TarInfo(f"cifar-10-batches-bin/data_batch_{k}.bin")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
        info.size = 0
        tar.addfile(info, io.BytesIO(b""))
    return hashlib.md5(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", choices=["lsun", "cifar10"], default="lsun")
    ap.add_argument("--kimg", type=float, default=4.0, help="kimg per phase, passed to bench_quality.py (default 4)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    out = OUT / args.source
    images = tiles()
    print(f"{len(images)} tiles of {TILE_PX} px from {len(no_face_photos())} photos with no face", flush=True)
    if args.source == "lsun":
        db = out / "set" / "tiles_lmdb"
        if not (db / "data.mdb").exists():
            write_lmdb(images, db)
        sets = [f"data.source=lsun", f"data.folder={db}", "crop.detector=center"]
    else:
        archive = out / "set" / "cifar-10-binary.tar.gz"
        checksum = write_cifar_archive(images, archive)
        sets = ["data.source=cifar10", f"data.url={archive.as_uri()}", f"data.md5={checksum}", "data.folder=null",
                "crop.detector=none"]
    cmd = [sys.executable, str(REPO / "bench" / "bench_quality.py"), "--kimg", str(args.kimg), "--out", str(out),
           "--threads", str(args.threads), "--eval-every-kimg", str(args.kimg), *(f"--set={s}" for s in sets)]
    print(" ".join(cmd), flush=True)
    raise SystemExit(subprocess.run(cmd).returncode)


if __name__ == "__main__":
    main()
