"""progan/checkpoint.py: the one reader of checkpoints and exports (weights_only, one-line errors)."""
import os
import pickle

import pytest
import torch

from progan import checkpoint
from progan.errors import ProganError
from progan.model import Generator, ModelConfig

TINY = ModelConfig(latent_dim=16, fmap_base=64, fmap_max=16, mbstd_group_size=4)


def _checkpoint(G, res_px, cfg=TINY, **extra):
    import dataclasses
    ckpt = {"format": "progan-checkpoint", "version": 1, "res_px": res_px, "model": dataclasses.asdict(cfg),
            "G": G.state_dict(), "D": {}, "G_ema": G.state_dict(), "nimg": 0}
    ckpt.update(extra)
    return ckpt


def _G(path):
    return checkpoint.load_generator(path).G


def test_load_generator_round_trip(tmp_path):
    torch.manual_seed(0)
    G = Generator(TINY, 8)
    path = tmp_path / "checkpoint.pt"
    torch.save(_checkpoint(G, 8), path)
    loaded = _G(path)
    assert isinstance(loaded, Generator) and loaded.res_px == 8 and loaded.cfg == TINY and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    z = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(loaded(z), G(z))
    exported = tmp_path / "G.pt"                                   # an export: G_ema alone
    ckpt = _checkpoint(G, 8, format="progan-generator")
    del ckpt["G"], ckpt["D"]
    torch.save(ckpt, exported)
    with torch.no_grad():
        assert torch.equal(_G(exported)(z), G(z))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('PROGAN_EVIL_MARKER', '/nonexistent/x')}",))


def test_load_generator_errors(tmp_path, monkeypatch):
    G = Generator(TINY, 8)
    good = tmp_path / "good.pt"
    torch.save(_checkpoint(G, 8), good)

    with pytest.raises(ProganError, match="not found") as e:
        _G(tmp_path / "missing.pt")
    assert "missing.pt" in str(e.value)

    for name, keep_bytes in [("half.pt", good.stat().st_size // 2), ("cut.pt", good.stat().st_size - 10),
                             ("empty.pt", 0)]:
        cut = tmp_path / name
        cut.write_bytes(good.read_bytes()[:keep_bytes])
        with pytest.raises(ProganError, match="truncated or corrupt") as e:
            _G(cut)
        assert str(e.value).startswith(str(cut)) and "\n" not in str(e.value)

    text = tmp_path / "notes.txt"
    text.write_text("hello, not a checkpoint\n")
    with pytest.raises(ProganError, match="notes.txt: not a progan checkpoint"):
        _G(text)

    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ProganError, match="not a progan checkpoint"):
        _G(other)

    old = tmp_path / "old.pt"
    torch.save(_checkpoint(G, 8, version=2), old)
    with pytest.raises(ProganError, match="version 2"):
        _G(old)

    mismatch = tmp_path / "mismatch.pt"
    torch.save(_checkpoint(G, 16), mismatch)                      # 8 px weights, claims 16 px
    with pytest.raises(ProganError, match="does not match"):
        _G(mismatch)

    marker = tmp_path / "pwned"
    monkeypatch.setenv("PROGAN_EVIL_MARKER", str(marker))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "progan-checkpoint", "payload": _Evil()}, protocol=2))
    with pytest.raises(ProganError, match="refused"):
        _G(evil)
    torch.save({"format": "progan-checkpoint", "payload": _Evil()}, evil)   # the same inside a torch zip file
    with pytest.raises(ProganError, match="refused"):
        _G(evil)
    assert not marker.exists()


def test_stage_and_generator_readers_report_the_same_damage_the_same_way(tmp_path):
    """One reader: a damaged results/4/checkpoint.pt reads the same (up to what to do) to training (load_stage)
    and to evaluate / the report / the API (load_generator)."""
    good = tmp_path / "good.pt"
    G = Generator(TINY, 4)
    checkpoint.save(good, _checkpoint(G, 4, opt_G={}, opt_D={}, cur_nimg=0, total_kimg=0.0))
    assert checkpoint.load_stage(good, 4)["res_px"] == 4 and checkpoint.load_generator(good).G.res_px == 4
    damage = {
        "missing.pt": (None, "checkpoint not found; run "),
        "empty.pt": (b"", "checkpoint is truncated or corrupt (empty file); "),
        "cut.pt": (good.read_bytes()[:-40], "checkpoint is truncated or corrupt ("),
        "text.pt": (b"hello\n", "not a progan checkpoint (not a torch.save file; "),
    }
    for name, (data, expected) in damage.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        messages = []
        for read in (lambda: checkpoint.load_stage(path, 4), lambda: checkpoint.load_generator(path)):
            with pytest.raises(ProganError) as e:
                read()
            messages.append(str(e.value))
        assert all(m.startswith(f"{path}: {expected}") and "\n" not in m for m in messages), messages
    for name, obj, expected in [("foreign.pt", {"weights": torch.zeros(1)}, "not a progan checkpoint (format None)"),
                                ("v2.pt", _checkpoint(G, 4, version=2), "checkpoint version 2, this code reads version 1")]:
        torch.save(obj, tmp_path / name)
        for read in (lambda: checkpoint.load_stage(tmp_path / name, 4), lambda: checkpoint.load_generator(tmp_path / name)):
            with pytest.raises(ProganError, match=f"^{tmp_path / name}: " + expected.replace("(", r"\(").replace(")", r"\)")):
                read()
    with pytest.raises(ProganError, match=r"holds the 4 px stage, expected 8 px; delete it and run `progan train --res 8`"):
        checkpoint.load_stage(good, 8)
