"""ProGAN networks (Karras et al. 2017): equalized-lr layers, G_paper / D_paper, fade-in and checkpoint loading."""
from progan.model.networks import (Discriminator, Generator, ModelConfig, fade_reals, load_generator,
                                   load_grown)

__all__ = ["ModelConfig", "Generator", "Discriminator", "load_generator", "load_grown", "fade_reals"]
