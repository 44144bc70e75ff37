"""G_paper / D_paper structure, fade-in continuity and growing (tiny fmaps, CPU)."""
import numpy as np
import pytest
import torch

from progan.errors import ProganError
from progan.model import Discriminator, Generator, ModelConfig, fade_reals, load_grown
from progan.model.layers import downsample2x, upsample2x
from progan.params import load as load_params

TINY = ModelConfig(latent_dim=16, fmap_base=64, fmap_max=16, mbstd_group_size=4)


def test_nf_table_of_the_paper_config():
    cfg = ModelConfig()
    table = {res: cfg.nf(res) for res in [4, 8, 16, 32, 64, 128, 256, 512, 1024]}
    assert table == {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
    assert cfg.nf(2) == 512                                   # stage 0: D's Dense0 width, latent size
    assert TINY.nf(4) == 16 and TINY.nf(8) == 16 and TINY.nf(16) == 8 and TINY.nf(64) == 2


def test_model_config_from_params_and_bad_values():
    params = load_params("params.yaml")
    cfg = ModelConfig.from_params(params)
    assert cfg == ModelConfig(latent_dim=params.model.latent_dim, fmap_base=params.model.fmap_base,
                              fmap_max=params.model.fmap_max, mbstd_group_size=params.model.mbstd_group_size)
    with pytest.raises(ProganError, match="model.fmap_max"):
        ModelConfig(fmap_max=0)
    with pytest.raises(ProganError, match="model.fmap_base"):
        ModelConfig(fmap_base=64).nf(1024)                    # 64 / 512 -> 0 feature maps
    with pytest.raises(ProganError, match="power of two"):
        Generator(TINY, 12)
    with pytest.raises(ProganError, match="power of two"):
        Discriminator(TINY, 8.0)
    assert Generator(TINY, np.int64(8)).res_px == 8 and type(Generator(TINY, np.int64(8)).res_px) is int


def test_mbstd_group_size_1_disables_the_layer():
    D = Discriminator(ModelConfig(latent_dim=16, fmap_base=64, fmap_max=16, mbstd_group_size=1), 8)
    assert D.blocks["4"].conv.weight.shape[1] == 16                     # no extra stddev feature map
    assert D(torch.randn(3, 3, 8, 8)).shape == (3,)                     # any batch size then
    assert Discriminator(TINY, 8).blocks["4"].conv.weight.shape[1] == 17


def test_discriminator_scores_parts_of_one_batch_as_if_alone():
    """D(x, alpha, parts=k) on k stacked minibatches = D on each (the minibatch stddev is per part, every other
    layer per sample), fading or not; with parts=1 a batch of reals and fakes would share groups and differ."""
    torch.manual_seed(5)
    D = Discriminator(TINY, 8).double()
    a, b = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randn(8, 3, 8, 8, dtype=torch.float64) * 3
    for alpha in (1.0, 0.3):
        joint = D(torch.cat([a, b]), alpha, parts=2)
        torch.testing.assert_close(joint, torch.cat([D(a, alpha), D(b, alpha)]), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(D(torch.cat([a, b]), alpha)[:8], D(a, alpha))


def test_parameter_count_of_the_paper_networks_at_1024():
    # Official README: G 23.1M and D 23.1M parameters at 1024x1024 (every toRGB/fromRGB included).
    with torch.device("meta"):
        G, D = Generator(ModelConfig(), 1024), Discriminator(ModelConfig(), 1024)
    n_G = sum(p.numel() for p in G.parameters())
    n_D = sum(p.numel() for p in D.parameters())
    assert n_G == 23_079_115 and n_D == 23_087_249
    # Hand count of G: 4x4 dense 512*8192 + bias 512, 4x4 conv, 8..32 two 512->512 convs, then halving.
    conv = lambda i, o, k=3: i * o * k * k + o                                       # noqa: E731
    nf = [512, 512, 512, 512, 256, 128, 64, 32, 16]                                    # 4 .. 1024
    hand = 512 * 8192 + 512 + conv(512, 512) + sum(conv(a, b) + conv(b, b) for a, b in zip(nf, nf[1:]))
    hand += sum(conv(n, 3, 1) for n in nf)
    assert n_G == hand


@pytest.mark.parametrize("res", [4, 8, 16, 32, 64, 128, 256, 512, 1024])
def test_shapes_at_every_resolution(res):
    cfg = ModelConfig(latent_dim=8, fmap_base=2048, fmap_max=4, mbstd_group_size=2)   # 4 fmaps everywhere
    torch.manual_seed(0)
    G, D = Generator(cfg, res), Discriminator(cfg, res)
    with torch.no_grad():
        img = G(torch.randn(2, 8), alpha=0.5)
        assert img.shape == (2, 3, res, res)
        score = D(img, alpha=0.5)
    assert score.shape == (2,) and torch.isfinite(score).all()
    assert sorted(G.to_rgb.keys(), key=int) == [str(2**k) for k in range(2, res.bit_length())]
    assert sorted(D.from_rgb.keys(), key=int) == sorted(D.blocks.keys(), key=int) == sorted(G.blocks.keys(), key=int)


def test_generator_fade_in_at_alpha_0_is_exactly_the_upsampled_old_generator():
    torch.manual_seed(0)
    G8, G16 = Generator(TINY, 8), Generator(TINY, 16)
    load_grown(G16, G8.state_dict())
    z = torch.randn(4, 16)
    with torch.no_grad():
        old = upsample2x(G8(z))
        assert torch.equal(G16(z, alpha=0.0), old)
        assert torch.equal(G16(z, alpha=torch.tensor(0.0)), old)
        assert torch.equal(G16(z, alpha=-3.0), old)                  # clipped like the official lerp_clip
        full = G16(z)                                                # alpha 1: the new branch only
        assert not torch.allclose(full, old)
        assert torch.allclose(G16(z, alpha=0.25), old + 0.25 * (full - old), atol=1e-6)
        assert torch.allclose(G16(z, alpha=torch.tensor(1.0)), full, atol=1e-6)


def test_discriminator_fade_in_at_alpha_0_is_the_old_discriminator_on_pooled_input():
    torch.manual_seed(0)
    D8, D16 = Discriminator(TINY, 8), Discriminator(TINY, 16)
    load_grown(D16, D8.state_dict())
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        old = D8(downsample2x(x))
        assert torch.equal(D16(x, alpha=0.0), old)
        assert torch.equal(D16(x, alpha=torch.tensor(0.0)), old)
        assert not torch.allclose(D16(x, alpha=1.0), old)


def test_generator_at_4px_has_no_fade_and_4x4_dense_bias_is_per_channel():
    G = Generator(TINY, 4)
    z = torch.randn(2, 16)
    assert torch.equal(G(z, alpha=0.0), G(z, alpha=1.0))
    assert G.blocks["4"].dense_bias.shape == (16,)               # official apply_bias after the reshape
    assert G.blocks["4"].dense.scale == pytest.approx(2**0.5 / 4 / 4)   # gain sqrt(2)/4, fan_in 16


def test_load_grown_subset_property_and_new_names():
    torch.manual_seed(0)
    for cls in (Generator, Discriminator):
        small, big = cls(TINY, 8), cls(TINY, 16)
        prev = small.state_dict()
        assert set(prev) < set(big.state_dict())
        new = load_grown(big, prev)
        assert set(new) == set(big.state_dict()) - set(prev)
        assert all(".16" in k or k.startswith(("blocks.16", "to_rgb.16", "from_rgb.16")) for k in new)
        for k, v in prev.items():
            assert torch.equal(big.state_dict()[k], v)
    expected_G_new = {"blocks.16.conv0.weight", "blocks.16.conv0.bias", "blocks.16.conv1.weight",
                      "blocks.16.conv1.bias", "to_rgb.16.weight", "to_rgb.16.bias"}
    assert set(load_grown(Generator(TINY, 16), Generator(TINY, 8).state_dict())) == expected_G_new


def test_load_grown_rejects_other_nets_and_changed_fmaps():
    with pytest.raises(ProganError, match="lacks"):
        load_grown(Generator(TINY, 16), Discriminator(TINY, 8).state_dict())
    wider = ModelConfig(latent_dim=16, fmap_base=64, fmap_max=32)
    with pytest.raises(ProganError, match="shape"):
        load_grown(Generator(TINY, 16), Generator(wider, 8).state_dict())


def test_weights_are_deterministic_given_the_seed():
    torch.manual_seed(5)
    a = Generator(TINY, 16).state_dict()
    torch.manual_seed(5)
    b = Generator(TINY, 16).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(5)
    c = Generator(TINY, 8).state_dict()                         # same prefix of weights at a lower resolution
    assert all(torch.equal(a[k], c[k]) for k in c)


def test_fade_reals_hand_values():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    assert torch.equal(fade_reals(x, 1.0), x)
    assert torch.equal(fade_reals(x, 0.0), torch.full((1, 1, 2, 2), 2.5))
    assert torch.allclose(fade_reals(x, 0.5)[0, 0], torch.tensor([[1.75, 2.25], [2.75, 3.25]]))
    assert torch.allclose(fade_reals(x, torch.tensor(0.5)), fade_reals(x, 0.5))


def test_bad_inputs_raise_progan_error():
    with pytest.raises(ProganError, match="latents"):
        Generator(TINY, 8)(torch.randn(2, 15))
    with pytest.raises(ProganError, match="images"):
        Discriminator(TINY, 8)(torch.randn(4, 3, 16, 16))
    with pytest.raises(ProganError, match="divisible"):
        Discriminator(TINY, 8)(torch.randn(6, 3, 8, 8))
