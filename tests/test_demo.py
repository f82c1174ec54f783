"""Pieces of ``vistune demo`` that do not need the shipped model."""

from types import SimpleNamespace

import numpy as np
import torch

from vistune.data import sample_scene
from vistune.demo import checker_ceiling, fidelity_reference, style_domain, vae_round_trip
from vistune.metrics import caption_fidelity


class _PixelVAE(torch.nn.Module):
    """A stand-in autoencoder whose latent is the image itself, times ``gain`` on decode."""

    def __init__(self, gain: float = 1.0, size: int = 32):
        super().__init__()
        self.gain, self.config = gain, SimpleNamespace(sample_size=size)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device and dtype

    device = property(lambda self: self.anchor.device)
    dtype = property(lambda self: self.anchor.dtype)

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z):
        return SimpleNamespace(sample=z * self.gain + (self.gain - 1))  # gain 0 decodes to black


def test_vae_round_trip_of_an_exact_autoencoder_returns_the_images():
    images = np.stack([sample_scene((1, i), size=32).image for i in range(5)])
    np.testing.assert_array_equal(vae_round_trip(_PixelVAE(), images, batch_size=2), images)


def test_checker_ceiling_is_the_checker_on_real_scenes_of_the_style_through_the_vae():
    images, captions = style_domain("outline", 40, 3, 32)
    direct = caption_fidelity(list(images), captions)
    assert direct >= 0.8
    assert checker_ceiling(_PixelVAE(), "outline", count=40, seed=3) == direct  # an exact decoder changes nothing
    assert checker_ceiling(_PixelVAE(gain=0.0), "outline", count=40, seed=3) == 0.0  # a decoder that draws nothing


def test_fidelity_reference_moves_from_the_plain_to_the_style_score_with_the_share_of_the_style_learned():
    assert fidelity_reference(0.8, 0.6, 0.0) == 0.8  # nothing learned: judged like plain images
    assert fidelity_reference(0.8, 0.6, 1.0) == 0.6  # all of the style: judged like real images of it
    assert abs(fidelity_reference(0.8, 0.6, 0.25) - 0.75) < 1e-12
    assert fidelity_reference(0.8, 0.6, -0.3) == 0.8 and fidelity_reference(0.8, 0.6, 1.7) == 0.6  # clipped
