"""ProGAN networks (Karras et al. 2017): equalized-lr layers, G_paper / D_paper, fade-in, growing (pure nn code)."""
from progan.model.networks import Discriminator, Generator, ModelConfig, fade_reals, load_grown

__all__ = ["ModelConfig", "Generator", "Discriminator", "load_grown", "fade_reals"]
