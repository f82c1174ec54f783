"""Min-SNR loss weighting of the shared training loss (``--snr_gamma``): weights against the formula, the loss
against a hand-weighted mean, and the flag's checks."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from vistune.sd_training import denoising_loss, min_snr_weights, sample_timesteps

from .conftest import load_script


class FixedPrediction(torch.nn.Module):
    """A stand-in U-Net whose prediction is a fixed tensor, so the loss depends only on targets and weights."""

    def __init__(self, prediction: torch.Tensor):
        super().__init__()
        self.prediction = prediction

    def forward(self, sample, timesteps, encoder_hidden_states=None):
        return SimpleNamespace(sample=self.prediction)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula(kind):
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=kind)
    t = torch.tensor([0, 10, 200, 500, 800, 999])
    a = scheduler.alphas_cumprod[t].double()
    snr = a / (1 - a)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr if kind == "epsilon" else snr + 1)
    torch.testing.assert_close(min_snr_weights(scheduler, t, 5.0).double(), expected, rtol=1e-4, atol=1e-7)
    # near-clean steps count for almost nothing; for epsilon a step with SNR below gamma keeps its full weight
    weights = min_snr_weights(scheduler, t, 5.0)
    assert weights[0] < 1e-3 and weights[0] < weights[3]
    if kind == "epsilon":
        assert weights[-1] == pytest.approx(1.0)


def test_weighted_loss_is_the_weighted_mean_and_huge_gamma_is_plain_mse():
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    unet = FixedPrediction(torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1)))
    context = torch.zeros(6, 3, 8)

    def loss(gamma):
        return denoising_loss(unet, scheduler, latents, context, torch.Generator().manual_seed(2), snr_gamma=gamma)

    # the same draws as denoising_loss makes: noise first, then the timesteps
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(latents.shape, generator=g)
    t = sample_timesteps(1000, 6, g)
    per_sample = F.mse_loss(unet.prediction, noise, reduction="none").mean((1, 2, 3))
    torch.testing.assert_close(loss(None), per_sample.mean())
    torch.testing.assert_close(loss(5.0), (per_sample * min_snr_weights(scheduler, t, 5.0)).mean())
    assert not torch.allclose(loss(5.0), loss(None))
    torch.testing.assert_close(loss(1e12), loss(None))  # gamma above every SNR: all weights are 1 (epsilon)


def test_loss_with_max_timestep_draws_its_timesteps_below_it():
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    class Recorder(FixedPrediction):
        def forward(self, sample, timesteps, encoder_hidden_states=None):
            seen.append(timesteps)
            return super().forward(sample, timesteps, encoder_hidden_states)

    unet = Recorder(torch.zeros(6, 4, 8, 8))
    denoising_loss(unet, scheduler, latents, torch.zeros(6, 3, 8), torch.Generator().manual_seed(2), max_timestep=50)
    g = torch.Generator().manual_seed(2)
    torch.randn(latents.shape, generator=g)  # the noise is drawn first
    torch.testing.assert_close(seen[0], sample_timesteps(1000, 6, g, max_timestep=50))
    assert int(seen[0].max()) < 50


@pytest.mark.parametrize("name", ["train_csc_tuner", "train_sc_tuner"])
@pytest.mark.parametrize("flag, value, message", [("--snr_gamma", "0", "--snr_gamma must be positive"),
                                                  ("--max_train_timestep", "0", "--max_train_timestep must be at least 1")])
def test_loss_flags_are_checked(name, flag, value, message, capsys):
    script = load_script(name)
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrained_model_name_or_path", "x", "--shapes_domain", "plain", flag, value])
    assert message in capsys.readouterr().err
