"""The Inception weights (progan.metrics.inception): fetched once from a real HTTP server on 127.0.0.1 into the
cache, verified by sha256 before anything unpickles them, loaded into torch-fidelity's real network; refused
with one line (and nothing loaded) when the hash is wrong; one line naming file, folder and URL offline.
The published weights cannot be downloaded in tests: the served file is the real architecture's state dict
with random weights, and its sha256 is pinned in place of the published one."""
from __future__ import annotations

import dataclasses
import hashlib
import pickle
import socket
from pathlib import Path

import pytest
import torch

from progan.metrics import inception
from test_download import serving


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """An empty cache and torch.hub folder, no mirror, no proxies (the server is local)."""
    monkeypatch.setenv(inception.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(inception.URL_ENV)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{inception.WEIGHTS.name}"


@pytest.fixture(scope="module")
def random_weights() -> bytes:
    """torch.save of torch-fidelity's FeatureExtractorInceptionV3 state dict with random weights."""
    from helpers import random_inception_weights

    return random_inception_weights()


def _pin(monkeypatch, data: bytes, url: str) -> inception.WeightsFile:
    pinned = dataclasses.replace(inception.WEIGHTS, url=url, sha256=hashlib.sha256(data).hexdigest(),
                                 size_bytes=len(data))
    monkeypatch.setattr(inception, "WEIGHTS", pinned)
    return pinned


class _RunsCode:
    """A pickle that touches a file when it is loaded (what a hostile .pth does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pinned_file_is_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    w = inception.WEIGHTS
    assert w.url == URL_INCEPTION_V3 and w.url.endswith("/" + w.name)
    assert w.name.split("-")[-1] == f"{w.sha256[:8]}.pth" and len(w.sha256) == 64


def test_fetched_once_verified_and_loaded_into_the_real_network(tmp_path, monkeypatch, random_weights):
    with serving() as srv:
        srv.files["/w.pth"] = random_weights
        w = _pin(monkeypatch, random_weights, f"{srv.url}/w.pth")
        net, source = inception.load_network("cpu")
        assert source == str(tmp_path / "cache" / w.name) and len(srv.requests) == 1
        assert Path(source).read_bytes() == random_weights
        x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        with torch.no_grad():
            features, logits = net(x)
        assert features.shape == (2, inception.FEATURE_DIM) and logits.shape == (2, inception.LOGITS_DIM)
        assert type(net).__module__ == "torch_fidelity.feature_extractor_inceptionv3"
        again, _ = inception.load_network("cpu")                                # never downloaded twice
        assert len(srv.requests) == 1
    assert not [f for f in (tmp_path / "cache").iterdir() if f.name.startswith(f".{w.name}.tmp")]


def test_a_copy_in_torch_hubs_folder_is_used_and_not_fetched(tmp_path, monkeypatch, random_weights):
    w = _pin(monkeypatch, random_weights, _closed_port_url())
    hub = tmp_path / "torch-home" / "hub" / "checkpoints" / w.name
    hub.parent.mkdir(parents=True)
    hub.write_bytes(random_weights)
    data, source = inception.weights_bytes()
    assert source == str(hub) and data == random_weights


@pytest.mark.parametrize("where", ["cache", "explicit", "download"])
def test_a_file_with_the_wrong_hash_is_refused_and_nothing_is_loaded(tmp_path, monkeypatch, where):
    marker = tmp_path / "code-ran"
    hostile = pickle.dumps(_RunsCode(marker))
    w = inception.WEIGHTS
    explicit = None
    if where == "cache":
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / w.name).write_bytes(hostile)
        path = tmp_path / "cache" / w.name
    elif where == "explicit":
        path = tmp_path / "mine.pth"
        path.write_bytes(hostile)
        explicit = str(path)
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    with serving() as srv:
        srv.files["/w.pth"] = hostile
        if where == "download":
            monkeypatch.setattr(inception, "WEIGHTS", dataclasses.replace(w, url=f"{srv.url}/w.pth"))
        with pytest.raises(inception.WeightsUnavailable) as err:
            inception.load_network("cpu", explicit=explicit)
    msg = str(err.value)
    assert "\n" not in msg and "nothing was" in msg and w.sha256 in msg, msg
    assert hashlib.sha256(hostile).hexdigest() in msg
    if where != "download":
        assert msg.startswith(f"{path}: refused: sha256 ")
    else:
        assert msg.startswith(f"{srv.url}/w.pth: the download's sha256 ")
        assert not (tmp_path / "cache" / w.name).exists()                       # nothing kept
        assert not [f for f in (tmp_path / "cache").iterdir() if ".tmp-" in f.name]
    assert not loads and not marker.exists()


def test_offline_without_the_file_is_one_line_naming_file_folder_and_url(tmp_path, monkeypatch):
    url = _closed_port_url()
    monkeypatch.setattr(inception, "WEIGHTS", dataclasses.replace(inception.WEIGHTS, url=url))
    with pytest.raises(inception.WeightsUnavailable) as err:
        inception.load_network("cpu")
    msg = str(err.value)
    dest = tmp_path / "cache" / inception.WEIGHTS.name
    assert msg.startswith(f"Inception weights for fid/kid/is: {dest} is missing and cannot be fetched (")
    assert f"download {url} (sha256 {inception.WEIGHTS.sha256}) to that path" in msg
    assert "evaluate.inception_weights: PATH" in msg and "\n" not in msg
    assert not dest.exists()


def test_a_mirror_is_used_and_still_hash_checked(tmp_path, monkeypatch, random_weights):
    with serving() as srv:
        srv.files["/mirror/w.pth"] = random_weights
        _pin(monkeypatch, random_weights, _closed_port_url())                   # the pinned URL is unreachable
        monkeypatch.setenv(inception.URL_ENV, f"{srv.url}/mirror/w.pth")
        data, _ = inception.weights_bytes()
        assert data == random_weights and len(srv.requests) == 1
        srv.files["/mirror/bad.pth"] = b"not the weights"
        monkeypatch.setenv(inception.URL_ENV, f"{srv.url}/mirror/bad.pth")
        monkeypatch.delenv(inception.CACHE_ENV)                                 # an empty cache: fetched again
        with pytest.raises(inception.WeightsUnavailable, match=r"/mirror/bad.pth: the download's sha256 "):
            inception.weights_bytes(configured_cache=str(tmp_path / "other"))


def test_an_explicit_path_that_is_missing_is_one_line(tmp_path):
    with pytest.raises(inception.WeightsUnavailable) as err:
        inception.load_network("cpu", explicit=str(tmp_path / "none.pth"))
    assert str(err.value) == (
        f"evaluate.inception_weights: {tmp_path / 'none.pth'}: no such file; download {inception.WEIGHTS.url} "
        f"(sha256 {inception.WEIGHTS.sha256}) to that path, or set evaluate.inception_weights: null to fetch it "
        f"into {tmp_path / 'cache'}")


def test_cache_folder_env_over_param_over_xdg(tmp_path, monkeypatch):
    assert inception.cache_dir("from-params") == tmp_path / "cache"
    monkeypatch.delenv(inception.CACHE_ENV)
    assert inception.cache_dir("from-params") == Path("from-params")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert inception.cache_dir(None) == tmp_path / "xdg" / "progan"
