"""The sources of issue #29 on real-format fixtures made here: the CIFAR-10 binary archive (a tar.gz of a few 3,073-byte
records per batch) over a real HTTP server on 127.0.0.1, an LSUN-style LMDB (WebP and JPEG values) read in place or
downloaded as a zip, and a folder of odd images (grey, palette, RGBA, 16-bit, CMYK, EXIF-rotated, non-square,
truncated) through the crop stage; `crop.detector: none` and `center` against the official dataset_tool.py
create_cifar10 / create_lsun computations, rebuilt here."""
from __future__ import annotations

import csv
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from progan import paths
from progan.data import cifar10, download, faces, lsun
from progan.errors import ProganError

from helpers import CELEBA_DIR, PHOTOS_DIR
from test_download import make_params, read_list, server  # noqa: F401  (the fixture)

RECORDS = 3                                  # per batch file: 5 x 3 = 15 training images, 3 test images


# ---------------------------------------------------------------------------------------------- fixtures

def cifar_records(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels uint8 [n], images uint8 [n, 32, 32, 3]) of real pictures: CelebA faces, centre-cropped to 32 px."""
    rng = np.random.default_rng(seed)
    files = sorted(CELEBA_DIR.glob("*.jpg"))
    images = [np.asarray(Image.open(files[int(k)]).convert("RGB").crop((0, 20, 178, 198)).resize((32, 32), Image.BOX))
              for k in rng.choice(len(files), n, replace=False)]
    return rng.integers(0, 10, n).astype(np.uint8), np.stack(images)


def cifar_batch_bytes(labels: np.ndarray, images: np.ndarray) -> bytes:
    """The binary version's layout, as its page describes it: <1 x label><3072 x pixel>, the pixels 1024 red, then
    green, then blue, rows top to bottom."""
    return b"".join(bytes([lab]) + img.transpose(2, 0, 1).tobytes() for lab, img in zip(labels, images))


def make_cifar_archive(path: Path, records: int = RECORDS, truncate: str | None = None) -> dict[str, np.ndarray]:
    """cifar-10-binary.tar.gz with cifar-10-batches-bin/{data_batch_1..5, test_batch}.bin and batches.meta.txt;
    returns {member name: images}. `truncate`: that member loses its last byte."""
    out = {}
    with tarfile.open(path, "w:gz") as tar:
        for k, name in enumerate([*cifar10.SPLITS["train"], *cifar10.SPLITS["test"], "batches.meta.txt"]):
            if name.endswith(".bin"):
                labels, images = cifar_records(k, records)
                data = cifar_batch_bytes(labels, images)
                out[name] = images
            else:
                data = b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n"
            if name == truncate:
                data = data[:-1]
            info = tarfile.TarInfo(f"{cifar10.MEMBER_DIR}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=90)
    return buf.getvalue()


def make_lmdb(folder: Path, values: list[bytes]) -> list[bytes]:
    """An LMDB database like LSUN's exports: 40-hex-digit keys, encoded images as values; returns the keys in
    key order."""
    import lmdb

    keys = [hashlib.sha1(v + bytes([i])).hexdigest().encode() for i, v in enumerate(values)]
    folder.parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(folder), map_size=64 << 20)
    with env.begin(write=True) as txn:
        for key, value in zip(keys, values):
            txn.put(key, value)
    env.close()
    return sorted(keys)


def lsun_values() -> list[bytes]:
    """Real photos as LSUN stores them (smaller side 256): JPEG like the scenes, WebP like the objects, one value
    that is not an image, one truncated JPEG."""
    photos = [p for p in sorted(PHOTOS_DIR.glob("*.jpg")) if "rot_90" not in p.name][:6]
    values = []
    for k, p in enumerate(photos):
        im = Image.open(p).convert("RGB")
        scale = 256 / min(im.size)
        im = im.resize((max(256, round(im.width * scale)), max(256, round(im.height * scale))), Image.BICUBIC)
        values.append(encoded(im, "WEBP" if k % 2 else "JPEG"))
    values.append(b"not an image at all")
    values.append(values[0][: len(values[0]) // 3])
    return values


# ---------------------------------------------------------------------------------------------- CIFAR-10

def test_cifar10_over_http_exports_the_records_and_is_not_repeated(tmp_path, monkeypatch, server):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    archive = tmp_path / "www" / "cifar-10-binary.tar.gz"
    archive.parent.mkdir()
    members = make_cifar_archive(archive)
    server.files["/cifar/cifar-10-binary.tar.gz"] = archive.read_bytes()
    p = make_params(tmp_path, source="cifar10", url=f"{server.url}/cifar/cifar-10-binary.tar.gz", md5=md5(archive))
    assert download.run(p) == 5 * RECORDS
    rows = read_list(tmp_path)
    assert [r[0] for r in rows] == [f"data/raw/cifar10-train/{k:06d}.png" for k in range(5 * RECORDS)]
    # create_cifar10: data_batch_1 .. 5 concatenated, each record reshape(-1, 3, 32, 32) (CHW) -> our HWC PNGs
    want = np.concatenate([members[n] for n in cifar10.SPLITS["train"]])
    got = np.stack([np.asarray(Image.open(tmp_path / r[0])) for r in rows])
    np.testing.assert_array_equal(got, want)
    requests, stamp = len(server.requests), (tmp_path / rows[0][0]).stat().st_mtime_ns
    assert download.run(p) == 5 * RECORDS                         # verified archive, same export: nothing redone
    assert len(server.requests) == requests and (tmp_path / rows[0][0]).stat().st_mtime_ns == stamp
    # the test batch, and both
    assert download.run(make_params(tmp_path, source="cifar10", url=p.data.url, md5=md5(archive),
                                    cifar10_split="test")) == RECORDS
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "data/raw/cifar10-test/000002.png")),
                                  members["test_batch.bin"][2])
    assert len(cifar10.export(archive, tmp_path / "all", "all")) == 6 * RECORDS
    assert len(server.requests) == requests


def test_cifar10_download_resumes_after_a_dropped_connection(tmp_path, monkeypatch, server):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    archive = tmp_path / "cifar-10-binary.tar.gz"
    make_cifar_archive(archive)
    server.files["/c/cifar-10-binary.tar.gz"] = archive.read_bytes()
    server.stop_after_bytes = 1000
    p = make_params(tmp_path, source="cifar10", url=f"{server.url}/c/cifar-10-binary.tar.gz", md5=md5(archive))
    with pytest.raises(ProganError, match="stopped at 1000 of .* bytes .*run the same command again to resume"):
        download.run(p)
    assert download.run(p) == 5 * RECORDS
    assert server.requests[-1]["Range"] == "bytes=1000-"


def test_cifar10_bad_archives_are_one_line_and_keep_the_export(tmp_path, monkeypatch, server):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.tar.gz"
    make_cifar_archive(good)
    cifar10.export(good, tmp_path / "out", "train")
    before = sorted((tmp_path / "out").iterdir())
    # a truncated record: the member is not a whole number of records
    bad = tmp_path / "bad.tar.gz"
    make_cifar_archive(bad, truncate="data_batch_3.bin")
    with pytest.raises(ProganError, match=rf"^{bad}: member cifar-10-batches-bin/data_batch_3.bin is 9218 bytes, not a "
                                          r"whole number of 3073-byte records \(a truncated record\)"):
        cifar10.export(bad, tmp_path / "out", "train")
    assert sorted((tmp_path / "out").iterdir()) == before               # the previous export is untouched
    assert not list(tmp_path.glob(".out.tmp-*"))
    # the python version (pickles), or anything else, is refused by name
    other = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ProganError, match=r"no member cifar-10-batches-bin/data_batch_1.bin; is it the CIFAR-10 binary"):
        cifar10.export(other, tmp_path / "out", "train")
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(ProganError, match=r"junk.tar.gz: not a readable tar.gz archive .*run `progan download` again"):
        cifar10.export(tmp_path / "junk.tar.gz", tmp_path / "out", "train")
    # a wrong checksum over HTTP: deleted, one line, the export kept
    server.files["/c/cifar-10-binary.tar.gz"] = good.read_bytes()
    p = make_params(tmp_path, source="cifar10", url=f"{server.url}/c/cifar-10-binary.tar.gz", md5="0" * 32)
    with pytest.raises(ProganError, match=r"^checksum mismatch for .*cifar-10-binary.tar.gz: md5 expected 0{32}, got "):
        download.run(p)
    assert not (tmp_path / download.DOWNLOADS_DIR / "cifar-10-binary.tar.gz").exists()
    # the official archive's published md5 is what an unset data.md5 checks
    assert cifar10.MD5 == "c32a1d4ab5d03f1284b67883e8d87530" and cifar10.URL.endswith("/cifar-10-binary.tar.gz")


# ---------------------------------------------------------------------------------------------- LSUN

def test_lsun_lmdb_in_place_key_order_max_images_and_bad_entries(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = lsun_values()
    keys = make_lmdb(tmp_path / "cat_lmdb", values)
    import lmdb
    with lmdb.open(str(tmp_path / "cat_lmdb"), readonly=True, lock=False) as env, env.begin() as txn:
        in_order = list(txn.cursor())                               # create_lsun's order: txn.cursor()
    decodable = [(k, v) for k, v in in_order if lsun.image_format(v) is not None]
    assert len(decodable) == 6 and len(in_order) == 8 and [k for k, _ in in_order] == keys
    p = make_params(tmp_path, source="lsun", folder="cat_lmdb", max_images=4)
    assert download.run(p) == 4
    rows = read_list(tmp_path)
    assert [Path(r[0]).name for r in rows] == [f"{k:07d}{lsun.SUFFIX[lsun.image_format(v)]}"
                                               for k, (_, v) in enumerate(decodable[:4])]
    for r, (key, value) in zip(rows, decodable):
        assert (tmp_path / r[0]).read_bytes() == value                    # the bytes as stored, not re-encoded
    keys_tsv = (tmp_path / "data/raw/lsun-cat_lmdb/images/keys.tsv").read_text().splitlines()
    assert keys_tsv[1:] == [f"{Path(r[0]).name}\t{k.decode()}" for r, (k, _) in zip(rows, decodable)]
    assert {Path(r[0]).suffix for r in rows} == {".jpg", ".webp"}
    # all of them: the undecodable entries (one not an image, one truncated JPEG) are skipped, not counted
    assert download.run(make_params(tmp_path, source="lsun", folder="cat_lmdb", max_images=None)) == 6


def test_lsun_zip_over_http_and_the_official_urls(tmp_path, monkeypatch, server):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    make_lmdb(tmp_path / "src" / "bedroom_train_lmdb", lsun_values()[:3])
    z = tmp_path / "bedroom_train_lmdb.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in (tmp_path / "src" / "bedroom_train_lmdb").iterdir():
            zf.write(f, f"bedroom_train_lmdb/{f.name}")
    server.files["/lsun/bedroom_train_lmdb.zip"] = z.read_bytes()
    p = make_params(tmp_path, source="lsun", url=f"{server.url}/lsun/bedroom_train_lmdb.zip", lsun_category="bedroom")
    assert download.run(p) == 3
    assert (tmp_path / "data/raw/lsun-bedroom_train_lmdb/lmdb/bedroom_train_lmdb/data.mdb").is_file()
    requests = len(server.requests)
    assert download.run(p) == 3 and len(server.requests) == requests
    assert lsun.url("bedroom") == "http://dl.yf.io/lsun/scenes/bedroom_train_lmdb.zip"
    assert lsun.url("churchoutdoor") == "http://dl.yf.io/lsun/scenes/church_outdoor_train_lmdb.zip"
    assert lsun.url("tvmonitor") == "http://dl.yf.io/lsun/objects/tv-monitor.zip"
    assert len(lsun.CATEGORIES) == 30 and lsun.CONFIG_LINE + lsun.CATEGORIES.index("car") == 69   # config.py L69


def test_lsun_bad_input_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ProganError, match=r"empty_dir: not an LMDB database \(no data.mdb in it\)"):
        download.run(make_params(tmp_path, source="lsun", folder="empty_dir"))
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "data.mdb").write_bytes(b"\0" * 100)
    with pytest.raises(ProganError, match=r"fake: not a readable LMDB database"):
        download.run(make_params(tmp_path, source="lsun", folder="fake"))
    make_lmdb(tmp_path / "empty_lmdb", [])
    with pytest.raises(ProganError, match=r"empty_lmdb: the LMDB database has no entries \(an empty category\)"):
        download.run(make_params(tmp_path, source="lsun", folder="empty_lmdb"))
    make_lmdb(tmp_path / "junk_lmdb", [b"abc", b"def"])
    with pytest.raises(ProganError, match=r"junk_lmdb: none of its 2 entries decodes as an image"):
        download.run(make_params(tmp_path, source="lsun", folder="junk_lmdb"))
    with pytest.raises(ProganError, match=r"data.source lsun needs data.lsun_category"):
        make_params(tmp_path, source="lsun")


# ---------------------------------------------------------------------------------------------- crop: none, center

def _crop(tmp_path, files, size_px, detector, min_kept=0.1):
    from helpers import default_params, write_params
    from progan import params as params_mod

    data = default_params()
    data["crop"].update(size=size_px, detector=detector, min_kept_fraction=min_kept)
    data["train"]["stages"] = {str(2**k): {"batch": 8, "lr": 0.001, "transition_kimg": 0 if k == 2 else 1,
                                          "stabilize_kimg": 1} for k in range(2, size_px.bit_length())}
    params = params_mod.load(write_params(tmp_path, data))
    tsv = tmp_path / paths.IMAGES_LIST
    tsv.parent.mkdir(parents=True, exist_ok=True)
    tsv.write_text("path\tbytes\n" + "".join(f"{f}\t0\n" for f in files))
    summary = faces.run(params)
    with open(tmp_path / paths.FACES_MANIFEST, newline="") as f:
        return summary, list(csv.DictReader(f))


def test_detector_none_passes_cifar_images_through_and_skips_other_sizes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    archive = tmp_path / "c.tar.gz"
    members = make_cifar_archive(archive)
    pngs = cifar10.export(archive, tmp_path / "cifar", "test")
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    Image.new("RGB", (48, 32)).save(tmp_path / "wide.png")
    summary, rows = _crop(tmp_path, [*pngs, tmp_path / "big.png", tmp_path / "wide.png"], 32, "none")
    assert [r["status"] for r in rows] == ["kept"] * 3 + ["skipped"] * 2
    assert rows[3]["reason"] == "not 32x32 px (got 64x64); crop.detector none takes images as they are (center " \
                                "centre-crops and resizes)"
    assert "got 48x32" in rows[4]["reason"] and summary["kept"] == 3
    for r, want in zip(rows, members["test_batch.bin"]):        # bit for bit: create_cifar10 adds them as they are
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / r["out"])), want)


def _official_create_lsun_crop(value: bytes, resolution: int) -> np.ndarray:
    """dataset_tool.py create_lsun's crop and resize, line by line (the decode is Pillow's; create_lsun's cv2 is not
    installed here, and it falls back to Pillow itself)."""
    img = np.asarray(Image.open(io.BytesIO(value)))
    crop = np.min(img.shape[:2])
    img = img[(img.shape[0] - crop) // 2: (img.shape[0] + crop) // 2, (img.shape[1] - crop) // 2: (img.shape[1] + crop) // 2]
    img = Image.fromarray(img, "RGB")
    img = img.resize((resolution, resolution), Image.LANCZOS)       # PIL.Image.ANTIALIAS
    return np.asarray(img)


@pytest.mark.parametrize("size_px", [256, 32])
def test_detector_center_is_create_lsun(tmp_path, monkeypatch, size_px):
    monkeypatch.chdir(tmp_path)
    values = lsun_values()[:6]
    make_lmdb(tmp_path / "db", values)
    files = lsun.export(tmp_path / "db", tmp_path / "exported", None)
    _, rows = _crop(tmp_path, files, size_px, "center")
    assert [r["status"] for r in rows] == ["kept"] * 6
    for r, f in zip(rows, files):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / r["out"])),
                                      _official_create_lsun_crop(f.read_bytes(), size_px))
        with Image.open(f) as im:
            side = min(im.size)
            if im.width != im.height:
                assert f"centre {side}x{side} of {im.width}x{im.height}" in r["reason"]
            assert (f"resized {side} -> {size_px} px" in r["reason"]) == (side != size_px)


# ---------------------------------------------------------------------------------------------- odd images

def test_a_folder_of_odd_images_and_what_the_manifest_says(tmp_path, monkeypatch):
    """Every odd kind through `progan download` (folder) and the crop (center, 32 px): kept with a note saying what
    was done, or skipped with the reason and counted; the stage never stops on one file."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "odd"
    folder.mkdir()
    face = Image.open(sorted(CELEBA_DIR.glob("*.jpg"))[0]).convert("RGB")          # 178 x 218
    rgba = face.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where((np.arange(218)[:, None] >= 20) & (np.arange(218)[:, None] < 40), 0, 255).astype(np.uint8).repeat(178, 1)))
    rgba.save(folder / "a_rgba.png")
    face.convert("L").save(folder / "b_grey.png")
    face.quantize(64).save(folder / "c_palette.gif")
    Image.fromarray(np.asarray(face.convert("L")).astype(np.uint16) * 257).save(folder / "d_grey16.png")
    face.convert("CMYK").save(folder / "e_cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    face.transpose(Image.Transpose.ROTATE_90).save(folder / "f_exif.jpg", exif=exif, quality=95)
    face.save(folder / "g_plain.jpg", quality=95)
    data = (folder / "g_plain.jpg").read_bytes()
    (folder / "h_truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "i_truncated.png").write_bytes((folder / "b_grey.png").read_bytes()[:300])
    p = make_params(tmp_path, source="folder", folder="odd")
    assert download.run(p) == 9
    import yaml
    cfg = yaml.safe_load((tmp_path / "params.yaml").read_text())
    cfg["crop"].update(size=32, detector="center", min_kept_fraction=0.5)
    cfg["train"]["stages"] = {r: s for r, s in cfg["train"]["stages"].items() if int(r) <= 32}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    from progan import params as params_mod
    summary = faces.run(params_mod.load(tmp_path / "params.yaml"))
    with open(tmp_path / paths.FACES_MANIFEST, newline="") as f:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(f)}
    assert summary["kept"] == 7 and summary["skipped"] == 2 and summary["reasons"] == {"truncated": 2}
    notes = {n: r["reason"] for n, r in rows.items() if r["status"] == "kept"}
    crop_note = "centre 178x178 of 178x218; resized 178 -> 32 px"
    assert notes == {
        "a_rgba.png": f"RGBA with transparency: alpha composited on white; {crop_note}",
        "b_grey.png": f"L converted to RGB; {crop_note}",
        "c_palette.gif": f"P converted to RGB; {crop_note}",
        "d_grey16.png": f"16-bit grey (I;16) rescaled to 8 bits; {crop_note}",
        "e_cmyk.jpg": f"CMYK converted to RGB; {crop_note}",
        "f_exif.jpg": f"EXIF orientation 6 applied; {crop_note}",
        "g_plain.jpg": crop_note,
    }
    assert rows["h_truncated.jpg"]["reason"] == "truncated" and rows["i_truncated.png"]["status"] == "skipped"
    # the rotated file comes out upright: the same crop as the plain one, up to JPEG loss
    out = {n: np.asarray(Image.open(tmp_path / r["out"]), float) for n, r in rows.items() if r["out"]}
    assert np.abs(out["f_exif.jpg"] - out["g_plain.jpg"]).mean() < 4
    assert out["a_rgba.png"][0].min() > 250                                          # the transparent band: white
