"""`data.source: lsun`: an LSUN category's official LMDB export -> its images as files in data/raw/lsun-<name>/.

Where the LMDB comes from, in this order:
  data.folder         the LMDB folder itself (holding data.mdb), read in place
  data.url            a zip of it (download.fetch: resumed, checksum-checked with data.sha256 / data.md5 when set)
  data.lsun_category  the category's official zip (fyu/lsun download.py / download_objects.py, config.py L61-90
                      names): scenes http://dl.yf.io/lsun/scenes/<name>_train_lmdb.zip, objects .../objects/<name>.zip
A zip is unpacked once (archive.extract: the safety checks of every archive here; the LMDB is the one folder in it
holding data.mdb) into data/raw/lsun-<zip name>/lmdb/.

The export follows the official dataset_tool.py create_lsun: entries in the database's key order (`txn.cursor()`),
each value an encoded image (JPEG for the scenes, WebP for the objects); one that does not decode is skipped and
counted, and the export stops after data.max_images decoded images (create_lsun's max_images: the TF config's
`lsun-<category>-100k` datasets, config.py L61-90, are its first 100,000). The value's bytes are written as they are
(no re-encoding) to <k:07d>.<format> in key order, with keys.tsv (file, LMDB key) beside them; a stamp names the
database and max_images, so a re-run writes nothing. The crop stage then takes create_lsun's centre crop and resize
to crop.size (crop.detector center). Decoding is Pillow's (create_lsun tries OpenCV first, then Pillow): an entry that
OpenCV decodes partly (a truncated JPEG) is kept there and skipped here.
A path that is not an LMDB database, or one with no entries, is one error line naming it.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from progan import paths
from progan.data import archive as archive_mod, download
from progan.data.transfer import read_state
from progan.errors import ProganError
from progan.fileio import write_json
from progan.log import log, progress

# config.py L61-90 category -> the name of its official export (scenes: fyu/lsun download.py; objects:
# download_objects.py).
SCENES = {"bedroom": "bedroom", "bridge": "bridge", "churchoutdoor": "church_outdoor", "classroom": "classroom",
          "conferenceroom": "conference_room", "diningroom": "dining_room", "kitchen": "kitchen",
          "livingroom": "living_room", "restaurant": "restaurant", "tower": "tower"}
OBJECTS = {"airplane": "airplane", "bicycle": "bicycle", "bird": "bird", "boat": "boat", "bottle": "bottle",
           "bus": "bus", "car": "car", "cat": "cat", "chair": "chair", "cow": "cow", "diningtable": "dining_table",
           "dog": "dog", "horse": "horse", "motorbike": "motorbike", "person": "person", "pottedplant": "potted_plant",
           "sheep": "sheep", "sofa": "sofa", "train": "train", "tvmonitor": "tv-monitor"}
CATEGORIES = sorted({**SCENES, **OBJECTS})     # config.py L61-90 lists them in this (alphabetical) order
CONFIG_LINE = 61                                # config.py line of CATEGORIES[0] (`-lsun-airplane`)
SUFFIX = {"JPEG": ".jpg", "WEBP": ".webp", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
STAMP = ".progan-lsun.json"
KEYS = "keys.tsv"


def url(category: str) -> str:
    """The official zip of a config.py category's training set."""
    if category in SCENES:
        return f"http://dl.yf.io/lsun/scenes/{SCENES[category]}_train_lmdb.zip"
    if category in OBJECTS:
        return f"http://dl.yf.io/lsun/objects/{OBJECTS[category]}.zip"
    raise ProganError(f"data.lsun_category: {category!r} is not one of the 30 LSUN categories ({', '.join(CATEGORIES)})")


def images(data, root: Path) -> list[Path]:
    """The LMDB of `data` (params.data: folder, url or lsun_category) exported to image files; returns them."""
    if data.folder:
        db = Path(root, data.folder)
        name = db.name
    else:
        source = data.url or url(data.lsun_category)
        zip_path = root / download.DOWNLOADS_DIR / download.file_name(source)
        max_bytes = int(data.max_download_mb * 2**20)
        download.fetch(source, zip_path, checksums=download._checksums(data), max_bytes=max_bytes)
        name = zip_path.name.split(".")[0]
        db = _unpacked(zip_path, root / paths.RAW_DIR / f"lsun-{name}" / "lmdb", download.EXTRACT_LIMIT_FACTOR * max_bytes)
    return export(db, root / paths.RAW_DIR / f"lsun-{name}" / "images", data.max_images)


def _unpacked(zip_path: Path, dest: Path, max_total_bytes: int) -> Path:
    """The LMDB folder inside the zip, unpacked once into `dest`."""
    st = zip_path.stat()
    stamp = {"archive": zip_path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    marker = dest.parent / ".progan-unpacked.json"
    if read_state(marker) != stamp:
        archive_mod.extract(zip_path, dest, max_total_bytes=max_total_bytes, require_suffixes=frozenset({".mdb"}))
        write_json(marker, stamp)
    found = sorted({p.parent for p in dest.rglob("data.mdb")})
    if len(found) != 1:
        raise ProganError(f"{zip_path}: holds {len(found)} LMDB databases (folders with data.mdb), not one; check "
                          f"data.url, or unpack it yourself and set data.folder to the database folder")
    return found[0]


def _open(db: Path):
    import lmdb

    if not (db / "data.mdb").is_file():
        raise ProganError(f"{db}: not an LMDB database (no data.mdb in it); set data.folder to the folder of an "
                          f"LSUN export (e.g. bedroom_train_lmdb)")
    try:
        return lmdb.open(str(db), readonly=True, lock=False, readahead=False, max_readers=1)
    except lmdb.Error as e:
        raise ProganError(f"{db}: not a readable LMDB database ({str(e).splitlines()[0]}); check data.folder / "
                          f"data.url") from None


def _stamp(db: Path, max_images: int | None) -> dict:
    st = (db / "data.mdb").stat()
    return {"lmdb": str(db), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "max_images": max_images}


def image_format(value: bytes) -> str | None:
    """The Pillow format of an encoded image that decodes whole, else None (create_lsun skips those)."""
    try:
        with Image.open(io.BytesIO(value)) as im:
            im.load()
            return im.format
    except Exception:      # noqa: BLE001 - any decoder failure means "skip this entry", as create_lsun's bare except
        return None


def export(db: str | os.PathLike, dest: str | os.PathLike, max_images: int | None) -> list[Path]:
    """The first `max_images` decodable entries of the LMDB `db` (key order) as dest/<k:07d>.<format>; returns them.
    Written once per database and max_images, into a temp folder renamed into place."""
    import lmdb

    db, dest = Path(db), Path(dest)
    stamp = _stamp(db, max_images) if (db / "data.mdb").is_file() else None
    if stamp is not None and read_state(dest / STAMP) == stamp:
        log.info("%s already exported into %s", db, dest)
        return _listed(dest)
    env = _open(db)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    kept = skipped = 0
    try:
        with env, env.begin(write=False) as txn:
            entries = txn.stat()["entries"]
            if entries == 0:
                raise ProganError(f"{db}: the LMDB database has no entries (an empty category); check data.folder, "
                                  f"data.url or data.lsun_category")
            want = entries if max_images is None else min(entries, max_images)
            keys = []
            with progress(total=want, desc="lsun export", unit="img") as bar:
                for key, value in txn.cursor():
                    fmt = image_format(value)
                    if fmt is None:
                        skipped += 1
                        continue
                    name = f"{kept:07d}{SUFFIX.get(fmt, '.' + fmt.lower())}"
                    (tmp / name).write_bytes(value)
                    keys.append(f"{name}\t{key.decode('ascii', 'backslashreplace')}\n")
                    kept += 1
                    bar.update(1)
                    if kept == max_images:
                        break
        if kept == 0:
            raise ProganError(f"{db}: none of its {entries} entries decodes as an image; not an LSUN export? check "
                              f"data.folder / data.url")
        (tmp / KEYS).write_text("file\tkey\n" + "".join(keys), encoding="utf-8")
        write_json(tmp / STAMP, stamp)
        tmp.chmod(0o755)                                        # mkdtemp makes it 0700
        archive_mod._replace_dir(tmp, dest)                     # the old export stays until the new one is whole
    except lmdb.Error as e:
        raise ProganError(f"{db}: cannot read the LMDB database ({str(e).splitlines()[0]}); check data.folder / "
                          f"data.url") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("lsun: exported %d images from %s into %s%s", kept, db, dest,
             f"; skipped {skipped} entries that do not decode" if skipped else "")
    return _listed(dest)


def _listed(dest: Path) -> list[Path]:
    return sorted(p for p in dest.iterdir() if p.suffix in SUFFIX.values())
