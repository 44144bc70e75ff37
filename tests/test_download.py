"""`progan download`: real http.server on 127.0.0.1 (Range support, can stop midway), real zips/tars of
CelebA JPEGs from /work/shared/data/celeba-aligned-2k, real files. Only Google Drive (the internet) is faked."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import stat
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from progan import params as params_mod
from progan import paths
from progan.data import archive, download, transfer
from progan.errors import ProganError

REPO = Path(__file__).resolve().parents[1]
CELEBA_2K = Path("/work/shared/data/celeba-aligned-2k")
N_IMAGES = 30


# ---------------------------------------------------------------- helpers

def make_params(root: Path, **data) -> params_mod.Params:
    """A copy of the repo's params.yaml in `root` with data.* keys replaced, loaded and validated."""
    cfg = yaml.safe_load((REPO / "params.yaml").read_text())
    cfg["data"].update(data)
    (root / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return params_mod.load(root / "params.yaml")


def read_list(root: Path) -> list[tuple[str, int]]:
    lines = (root / paths.IMAGES_LIST).read_text().splitlines()
    assert lines[0] == "path\tbytes"
    return [(p, int(n)) for p, n in (line.split("\t") for line in lines[1:])]


class RangeHandler(BaseHTTPRequestHandler):
    """Serves server.files; honours `Range: bytes=N-` unless server.ignore_range; server.stop_after_bytes
    (one shot) closes the connection after that many body bytes, as a dropped transfer does. server.types[path]:
    its Content-Type; server.redirects[path]: a 302 to that path; server.trickle_s: the body one byte every that
    many seconds (a server that keeps a connection alive without sending anything useful)."""

    def do_GET(self):
        srv = self.server
        srv.requests.append(dict(self.headers))
        if self.path in srv.redirects:
            self.send_response(302)
            self.send_header("Location", srv.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if m and not srv.ignore_range:
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", '"v1"')
        if self.path in srv.types:
            self.send_header("Content-Type", srv.types[self.path])
        self.end_headers()
        data = body[start:]
        if srv.stop_after_bytes is not None:
            data, srv.stop_after_bytes = data[:srv.stop_after_bytes], None
        if srv.trickle_s:
            self._trickle(data, srv.trickle_s)
            return
        self.wfile.write(data)
        self.wfile.flush()

    def _trickle(self, data: bytes, every_s: float):
        for k in range(len(data)):
            if self.server.closing.wait(every_s):
                return
            try:
                self.wfile.write(data[k:k + 1])
                self.wfile.flush()
            except OSError:                      # the client gave up
                return

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(handler=None):
    """A real http.server on 127.0.0.1 (a free port) in a thread: `srv.files[path] = bytes` to serve them."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler or RangeHandler)
    srv.files, srv.requests, srv.ignore_range, srv.stop_after_bytes = {}, [], False, None
    srv.types, srv.redirects, srv.trickle_s, srv.closing = {}, {}, None, threading.Event()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.closing.set()                        # a trickling handler stops
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with serving() as srv:
        yield srv


@pytest.fixture(scope="module")
def sources() -> list[Path]:
    files = sorted(CELEBA_2K.glob("*.jpg"))[:N_IMAGES]
    assert len(files) == N_IMAGES
    return files


@pytest.fixture(scope="module")
def faces_zip(tmp_path_factory, sources) -> Path:
    """~30 CelebA JPEGs under img_align_celeba/, as in the official zip."""
    path = tmp_path_factory.mktemp("zip") / "faces.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("img_align_celeba/", b"")
        for f in sources:
            zf.write(f, f"img_align_celeba/{f.name}")
        zf.writestr("img_align_celeba/README.txt", b"not an image")
    return path


def expected_rows(sources) -> list[tuple[str, int]]:
    return [(f"{download.IMAGES_DIR}/img_align_celeba/{f.name}", f.stat().st_size) for f in sources]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- url source over HTTP

def test_http_download_extracts_lists_and_is_not_repeated(tmp_path, monkeypatch, server, faces_zip, sources):
    monkeypatch.chdir(tmp_path)
    server.files["/dl/faces.zip"] = faces_zip.read_bytes()
    p = make_params(tmp_path, source="url", url=f"{server.url}/dl/faces.zip", sha256=sha256(faces_zip))
    assert download.run(p) == N_IMAGES
    assert read_list(tmp_path) == expected_rows(sources)  # sorted, relative, README.txt left out
    got = tmp_path / download.DOWNLOADS_DIR / "faces.zip"
    assert got.read_bytes() == faces_zip.read_bytes()
    assert not got.with_name("faces.zip.part").exists()
    extracted = tmp_path / download.IMAGES_DIR / "img_align_celeba" / sources[3].name
    assert extracted.read_bytes() == sources[3].read_bytes()
    n_requests = len(server.requests)
    assert download.run(p) == N_IMAGES  # verified file on disk: no second download
    assert len(server.requests) == n_requests


def test_interrupted_download_resumes_with_range(tmp_path, monkeypatch, server, faces_zip):
    monkeypatch.chdir(tmp_path)
    body = faces_zip.read_bytes()
    half = len(body) // 2
    server.files["/faces.zip"] = body
    server.stop_after_bytes = half
    p = make_params(tmp_path, source="url", url=f"{server.url}/faces.zip", md5=hashlib.md5(body).hexdigest())
    with pytest.raises(ProganError, match="run the same command again to resume"):
        download.run(p)
    final = tmp_path / download.DOWNLOADS_DIR / "faces.zip"
    part = final.with_name("faces.zip.part")
    assert not final.exists()
    assert part.stat().st_size == half
    assert download.run(p) == N_IMAGES
    assert "Range" not in server.requests[0]
    assert server.requests[1]["Range"] == f"bytes={half}-"
    assert server.requests[1]["If-Range"] == '"v1"'
    assert final.read_bytes() == body
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(tmp_path, monkeypatch, server, faces_zip):
    monkeypatch.chdir(tmp_path)
    body = faces_zip.read_bytes()
    server.files["/faces.zip"] = body
    server.stop_after_bytes = 1000
    p = make_params(tmp_path, source="url", url=f"{server.url}/faces.zip")
    with pytest.raises(ProganError, match="stopped at 1000 of"):
        download.run(p)
    server.ignore_range = True
    assert download.run(p) == N_IMAGES
    assert server.requests[1]["Range"] == "bytes=1000-"
    assert (tmp_path / download.DOWNLOADS_DIR / "faces.zip").read_bytes() == body  # not 1000 bytes twice


def test_complete_part_left_by_a_crash_is_not_fetched_again(tmp_path, monkeypatch, server, faces_zip):
    """A part that already holds every byte (killed before the rename): the server answers 416."""
    monkeypatch.chdir(tmp_path)
    body = faces_zip.read_bytes()
    server.files["/faces.zip"] = body
    server.stop_after_bytes = 10
    p = make_params(tmp_path, source="url", url=f"{server.url}/faces.zip", sha256=sha256(faces_zip))
    with pytest.raises(ProganError, match="resume"):
        download.run(p)
    (tmp_path / download.DOWNLOADS_DIR / "faces.zip.part").write_bytes(body)
    assert download.run(p) == N_IMAGES
    assert server.requests[1]["Range"] == f"bytes={len(body)}-" and len(server.requests) == 2


def test_checksum_mismatch_leaves_no_file(tmp_path, monkeypatch, server, faces_zip):
    monkeypatch.chdir(tmp_path)
    server.files["/faces.zip"] = faces_zip.read_bytes()
    wrong = "ab" * 32
    p = make_params(tmp_path, source="url", url=f"{server.url}/faces.zip", sha256=wrong)
    with pytest.raises(ProganError) as err:
        download.run(p)
    msg = str(err.value)
    assert f"sha256 expected {wrong}, got {sha256(faces_zip)}" in msg and "\n" not in msg
    assert list((tmp_path / download.DOWNLOADS_DIR).glob("faces.zip*")) == []
    assert not (tmp_path / paths.IMAGES_LIST).exists()


# ---------------------------------------------------------------- celeba

def test_celeba_mirror_uses_published_md5_by_default(tmp_path, monkeypatch, server, faces_zip, sources):
    monkeypatch.chdir(tmp_path)
    server.files["/mirror/img_align_celeba.zip"] = faces_zip.read_bytes()
    url = f"{server.url}/mirror/img_align_celeba.zip"
    p = make_params(tmp_path, source="celeba", url=url)
    with pytest.raises(ProganError, match=f"md5 expected {download.CELEBA_MD5}, got "
                                          f"{hashlib.md5(faces_zip.read_bytes()).hexdigest()}"):
        download.run(p)
    p = make_params(tmp_path, source="celeba", url=url, md5=hashlib.md5(faces_zip.read_bytes()).hexdigest())
    assert download.run(p) == N_IMAGES
    assert (tmp_path / download.DOWNLOADS_DIR / download.CELEBA_ZIP).read_bytes() == faces_zip.read_bytes()
    assert read_list(tmp_path) == expected_rows(sources)


def test_celeba_google_drive_through_gdown(tmp_path, monkeypatch, faces_zip):
    """The internet is faked: gdown.download writes the zip where it was asked to."""
    import inspect

    import gdown

    calls = []
    real = inspect.signature(gdown.download)

    def fake_download(**kwargs):
        real.bind(**kwargs)  # the installed gdown takes these arguments
        calls.append(kwargs)
        Path(kwargs["output"]).write_bytes(faces_zip.read_bytes())
        return kwargs["output"]

    monkeypatch.setattr(gdown, "download", fake_download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProganError, match=f"md5 expected {download.CELEBA_MD5}"):
        download.run(make_params(tmp_path, source="celeba"))
    assert calls[0]["id"] == download.CELEBA_DRIVE_ID and calls[0]["resume"] is True
    assert not list((tmp_path / download.DOWNLOADS_DIR).iterdir())  # bad download deleted
    p = make_params(tmp_path, source="celeba", sha256=sha256(faces_zip))
    assert download.run(p) == N_IMAGES
    assert (tmp_path / download.DOWNLOADS_DIR / download.CELEBA_ZIP).exists()


# ---------------------------------------------------------------- file:// and schemes

def test_file_url_archive_detected_by_content(tmp_path, monkeypatch, sources):
    monkeypatch.chdir(tmp_path)
    src = tmp_path.parent / f"{tmp_path.name}-src" / "faces.bin"  # tar.gz without the name saying so
    src.parent.mkdir()
    with tarfile.open(src, "w:gz") as tf:
        for f in sources:
            tf.add(f, f"img_align_celeba/{f.name}")
    p = make_params(tmp_path, source="url", url=src.as_uri())
    assert download.run(p) == N_IMAGES
    assert read_list(tmp_path) == expected_rows(sources)


def test_file_url_single_image(tmp_path, monkeypatch, sources):
    monkeypatch.chdir(tmp_path)
    p = make_params(tmp_path, source="url", url=sources[0].as_uri())
    assert download.run(p) == 1
    assert read_list(tmp_path) == [(f"{download.DOWNLOADS_DIR}/{sources[0].name}", sources[0].stat().st_size)]


@pytest.mark.parametrize("url", ["ftp://example.com/faces.zip", "gopher://x/y", "data:,x"])
def test_non_http_scheme_refused(tmp_path, url):
    with pytest.raises(ProganError, match="not supported"):
        download.fetch(url, tmp_path / "x.zip", max_bytes=1 << 20)
    with pytest.raises(ProganError, match="data.url must be an http://"):
        make_params(tmp_path, source="url", url=url)


# ---------------------------------------------------------------- folder source

def test_folder_source_lists_in_place(tmp_path, monkeypatch, sources):
    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / ".cache").mkdir()
    names = {"b.jpg": 0, "A.JPG": 1, "c.png": 2, "sub/d.jpeg": 3, ".hidden.jpg": 4, ".cache/e.jpg": 5}
    for name, i in names.items():
        (photos / name).write_bytes(sources[i].read_bytes())
    (photos / "notes.txt").write_text("x")
    p = make_params(tmp_path, source="folder", folder="photos")
    assert download.run(p) == 4
    size = {n: sources[i].stat().st_size for n, i in names.items()}
    assert read_list(tmp_path) == [("photos/A.JPG", size["A.JPG"]), ("photos/b.jpg", size["b.jpg"]),
                                   ("photos/c.png", size["c.png"]), ("photos/sub/d.jpeg", size["sub/d.jpeg"])]
    assert not (tmp_path / download.DOWNLOADS_DIR).exists()  # nothing copied
    assert download.run(make_params(tmp_path, source="folder", folder="photos", max_images=2)) == 2
    assert [r[0] for r in read_list(tmp_path)] == ["photos/A.JPG", "photos/b.jpg"]


def test_folder_outside_root_gives_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = make_params(tmp_path, source="folder", folder=str(CELEBA_2K), max_images=5)
    assert download.run(p) == 5
    first = sorted(CELEBA_2K.glob("*.jpg"))[:5]
    assert read_list(tmp_path) == [(str(f), f.stat().st_size) for f in first]


# ---------------------------------------------------------------- unsafe archives

JPEG = (CELEBA_2K / "000058.jpg").read_bytes() if CELEBA_2K.exists() else b"\xff\xd8\xff"


def zip_with(path: Path, name: str, mode: int | None = None, data: bytes = JPEG) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok/1.jpg", JPEG)
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        zf.writestr(info, data)
    return path


def tar_with(path: Path, name: str, type_: bytes, linkname: str = "") -> Path:
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("ok/1.jpg")
        ok.size = len(JPEG)
        tf.addfile(ok, io.BytesIO(JPEG))
        info = tarfile.TarInfo(name)
        info.type, info.linkname = type_, linkname
        if type_ == tarfile.REGTYPE:
            info.size = len(JPEG)
        tf.addfile(info, io.BytesIO(JPEG) if type_ == tarfile.REGTYPE else None)
    return path


@pytest.mark.parametrize("make, member, why", [
    (lambda p: zip_with(p, "../evil.jpg"), "../evil.jpg", "path traversal"),
    (lambda p: zip_with(p, "a/../../evil.jpg"), "a/../../evil.jpg", "path traversal"),
    (lambda p: zip_with(p, "/tmp/evil.jpg"), "/tmp/evil.jpg", "absolute path"),
    (lambda p: zip_with(p, "link.jpg", stat.S_IFLNK | 0o777, b"/etc/passwd"), "link.jpg", "it is a symlink"),
    (lambda p: zip_with(p, "fifo", stat.S_IFIFO | 0o644), "fifo", "device, fifo or socket"),
    (lambda p: tar_with(p, "/etc/evil.jpg", tarfile.REGTYPE), "/etc/evil.jpg", "absolute path"),
    (lambda p: tar_with(p, "../evil.jpg", tarfile.REGTYPE), "../evil.jpg", "path traversal"),
    (lambda p: tar_with(p, "link.jpg", tarfile.SYMTYPE, "/etc/passwd"), "link.jpg", "it is a symlink to '/etc/passwd'"),
    (lambda p: tar_with(p, "hard.jpg", tarfile.LNKTYPE, "ok/1.jpg"), "hard.jpg", "it is a hardlink to 'ok/1.jpg'"),
    (lambda p: tar_with(p, "fifo", tarfile.FIFOTYPE), "fifo", "it is a device or fifo"),
    (lambda p: tar_with(p, "dev", tarfile.CHRTYPE), "dev", "it is a device or fifo"),
], ids=["zip-dotdot", "zip-inner-dotdot", "zip-absolute", "zip-symlink", "zip-fifo", "tar-absolute", "tar-dotdot",
        "tar-symlink", "tar-hardlink", "tar-fifo", "tar-device"])
def test_unsafe_members_refused(tmp_path, make, member, why):
    bad = make(tmp_path / "bad.archive")
    dest = tmp_path / "out" / "images"
    with pytest.raises(ProganError, match=re.escape(f"refused member {member!r}: ") + ".*" + re.escape(why)):
        archive.extract(bad, dest, max_total_bytes=1 << 30)
    assert not dest.exists() and not list((tmp_path / "out").iterdir())  # nothing written, temp dir gone
    assert not (tmp_path / "evil.jpg").exists()


def test_decompression_bombs_refused(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.jpg", bytes(4 << 20))  # 4 MiB of zeros deflate ~1000:1
    with pytest.raises(ProganError, match=r"refused member 'zeros.jpg': compression ratio \d+:1 is over 100:1"):
        archive.extract(bomb, tmp_path / "out", max_total_bytes=1 << 30)
    ok = zip_with(tmp_path / "ok.zip", "b.jpg")
    with pytest.raises(ProganError, match="would unpack to .* over the limit"):
        archive.extract(ok, tmp_path / "out", max_total_bytes=len(JPEG))  # 2 x JPEG > limit
    assert not (tmp_path / "out").exists()
    assert archive.extract(ok, tmp_path / "out", max_total_bytes=2 * len(JPEG)) == 2


def test_extract_replaces_previous_tree(tmp_path):
    dest = tmp_path / "images"
    (dest / "old").mkdir(parents=True)
    (dest / "old" / "x.jpg").write_bytes(JPEG)
    assert archive.extract(zip_with(tmp_path / "a.zip", "sub/2.jpg"), dest, max_total_bytes=1 << 30) == 2
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.jpg")) == ["ok/1.jpg", "sub/2.jpg"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    # An archive without images is refused before the previous tree is touched.
    no_images = tmp_path / "b.zip"
    with zipfile.ZipFile(no_images, "w") as z:
        z.writestr("readme.txt", "no faces here")
    with pytest.raises(ProganError, match="b.zip: the archive holds no image files .*nothing was extracted"):
        archive.extract(no_images, dest, max_total_bytes=1 << 30, require_suffixes=frozenset({".jpg"}))
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.jpg")) == ["ok/1.jpg", "sub/2.jpg"]


def test_safe_parts():
    assert archive.safe_parts("./a//b/./c.jpg", "x") == ("a", "b", "c.jpg")
    for name in ("..\\evil.jpg", "C:/evil.jpg", "\\evil.jpg", "a/b/../../.."):
        with pytest.raises(ProganError):
            archive.safe_parts(name, "x")


# ---------------------------------------------------------------- no hang, no failure that sticks (issue #33)

def test_speed_floor_defaults_are_curl_like():
    """curl --speed-limit 1024 --speed-time 60: the floor under which a transfer is given up."""
    assert (transfer.SPEED_FLOOR_BYTES_PER_S, transfer.SPEED_WINDOW_S) == (1024, 60.0)


@pytest.mark.timeout(60)
def test_trickle_is_stopped_by_the_speed_floor_and_resumes(tmp_path, server, faces_zip):
    """Headers, then one byte every 0.2 s: each read returns (a per-read timeout never fires), the speed floor
    (100 B/s over 1 s here) stops it with one line, the .part is kept and the next run resumes from it."""
    body = faces_zip.read_bytes()
    server.files["/faces.zip"] = body
    server.trickle_s = 0.2
    dest = tmp_path / "faces.zip"
    t = time.monotonic()
    with pytest.raises(ProganError, match=r"faces.zip stalled: under 100 bytes/s for 1 s \(\d+ bytes so far\); "
                                          r".*faces.zip.part is kept: run the same command again to resume$"):
        transfer.fetch(f"{server.url}/faces.zip", dest, max_bytes=1 << 30, speed_floor=100, speed_window_s=1.0)
    assert time.monotonic() - t < 10
    got = dest.with_name("faces.zip.part").read_bytes()
    assert 1 <= len(got) < 50 and body.startswith(got)
    server.trickle_s = None
    transfer.fetch(f"{server.url}/faces.zip", dest, max_bytes=1 << 30, speed_floor=100, speed_window_s=1.0)
    assert dest.read_bytes() == body and server.requests[-1]["Range"] == f"bytes={len(got)}-"


@pytest.mark.timeout(60)
def test_silent_server_times_out_within_the_speed_window(tmp_path, server):
    """Headers and then nothing: the socket timeout is the speed window (1 s here), not 60 s per read."""
    server.files["/x.zip"] = b"PK" * 100
    server.trickle_s = 100.0
    t = time.monotonic()
    with pytest.raises(ProganError, match=r"x.zip stopped at 0 bytes \(timed out\); .* is kept"):
        transfer.fetch(f"{server.url}/x.zip", tmp_path / "x.zip", max_bytes=1 << 20, speed_window_s=1.0)
    assert time.monotonic() - t < 10


@pytest.mark.timeout(60)
def test_truncated_zip_is_not_kept_and_the_good_one_is_fetched_next(tmp_path, monkeypatch, server, faces_zip):
    """A server with a cut zip (whole per its Content-Length): 'truncated', nothing kept as done; once the server
    has the good file the same command downloads and lists it."""
    monkeypatch.chdir(tmp_path)
    body = faces_zip.read_bytes()
    server.files["/faces.zip"] = body[: len(body) // 2]
    p = make_params(tmp_path, source="url", url=f"{server.url}/faces.zip")
    with pytest.raises(ProganError, match=r"faces.zip: truncated zip archive \(its central directory, at the end, "
                                          r"is missing\); the bad download was deleted"):
        download.run(p)
    assert list((tmp_path / download.DOWNLOADS_DIR).iterdir()) == []
    server.files["/faces.zip"] = body
    assert download.run(p) == N_IMAGES
    assert (tmp_path / download.DOWNLOADS_DIR / "faces.zip").read_bytes() == body


@pytest.mark.timeout(60)
def test_a_download_that_does_not_unpack_is_fetched_again(tmp_path, monkeypatch, server, faces_zip):
    """An archive refused at unpacking (here: no images) loses its 'downloaded' state: the next run asks the
    server again instead of saying 'already downloaded' and failing the same way."""
    monkeypatch.chdir(tmp_path)
    no_images = io.BytesIO()
    with zipfile.ZipFile(no_images, "w") as zf:
        zf.writestr("README.txt", "later")
    server.files["/faces.zip"] = no_images.getvalue()
    p = make_params(tmp_path, source="url", url=f"{server.url}/faces.zip")
    with pytest.raises(ProganError, match="the archive holds no image files"):
        download.run(p)
    server.files["/faces.zip"] = faces_zip.read_bytes()
    assert download.run(p) == N_IMAGES
    assert len(server.requests) == 2


@pytest.mark.timeout(60)
def test_unpacked_counts_only_once_listed_and_while_whole(tmp_path, monkeypatch, faces_zip, sources):
    monkeypatch.chdir(tmp_path)
    p = make_params(tmp_path, source="url", url=faces_zip.as_uri())
    tsv = tmp_path / paths.IMAGES_LIST
    tsv.mkdir(parents=True)                                   # the list cannot be written after the extraction
    with pytest.raises(OSError):
        download.run(p)
    marker = tmp_path / download.IMAGES_DIR / download.UNPACKED_MARKER
    assert (tmp_path / download.IMAGES_DIR).is_dir() and not marker.exists()
    tsv.rmdir()
    assert download.run(p) == N_IMAGES and marker.exists()
    gone = tmp_path / download.IMAGES_DIR / "img_align_celeba" / sources[0].name
    gone.unlink()                                             # the unpacked tree lost a file: unpacked again
    assert download.run(p) == N_IMAGES and gone.read_bytes() == sources[0].read_bytes()


def _latin1_tar(path: Path, sources) -> None:
    """A tar whose member name holds the Latin-1 byte 0xE9 (not UTF-8), as old archives do."""
    with tarfile.open(path, "w", encoding="utf-8", errors="surrogateescape") as tf:
        for name, f in ((os.fsdecode(b"img/caf\xe9.jpg"), sources[0]), ("img/plain.jpg", sources[1])):
            tf.add(f, name)


def _cp437_zip(path: Path, sources) -> None:
    """A zip whose member name is the byte 0x82 without the UTF-8 flag (a DOS/Windows zip: cp437, 'é')."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.write(sources[0], "img/cafX.jpg")
        zf.write(sources[1], "img/plain.jpg")
    path.write_bytes(buf.getvalue().replace(b"img/cafX.jpg", b"img/caf\x82.jpg"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("build, on_disk, listed", [
    (_latin1_tar, b"img/caf\xe9.jpg", "img/caf%E9.jpg"),
    (_cp437_zip, "img/café.jpg".encode(), "img/café.jpg"),
], ids=["tar-latin1", "zip-cp437"])
def test_names_that_are_not_utf8_go_through_download_and_crop(tmp_path, monkeypatch, sources, build, on_disk,
                                                              listed):
    """Real bytes in the archive: the file lands under that name, images.tsv lists it %-escaped (valid UTF-8),
    and the crop reads it back from that text and names it the same way in manifest.csv."""
    from progan.data import faces

    monkeypatch.chdir(tmp_path)
    src = tmp_path / "src.archive"
    build(src, sources)
    p = make_params(tmp_path, source="url", url=src.as_uri())
    assert download.run(p) == 2
    assert (tmp_path / os.fsdecode(download.IMAGES_DIR.encode() + b"/" + on_disk)).read_bytes() \
        == sources[0].read_bytes()
    name = f"{download.IMAGES_DIR}/{listed}"
    assert name in [r[0] for r in read_list(tmp_path)]
    cfg = yaml.safe_load((tmp_path / "params.yaml").read_text())
    cfg["crop"].update(detector="center", size=16)
    cfg["train"]["stages"] = {r: cfg["train"]["stages"][r] for r in ("4", "8", "16")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    faces.run(params_mod.load(tmp_path / "params.yaml"))
    manifest = (tmp_path / paths.FACES_MANIFEST).read_text(encoding="utf-8")
    assert f"{name}," in manifest and manifest.count(",kept,") == 2
