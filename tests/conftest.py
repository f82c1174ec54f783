import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from vistune.testing import tiny_sd_pipeline, tiny_unet


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    """Import ``scripts/<name>.py`` as module ``name`` (scripts are not a package), so tests can call ``main``."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def kill_after(script, monkeypatch, argv: list[str], losses: int) -> None:
    """Run a training script's ``main(argv)`` and "kill" it (KeyboardInterrupt) when its ``denoising_loss`` is
    called for the ``losses + 1``-th time, as a process dying mid-run."""
    real_loss, count = script.denoising_loss, [0]

    def dying(*args, **kwargs):
        count[0] += 1
        if count[0] > losses:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(script, "denoising_loss", dying)
    try:
        with pytest.raises(KeyboardInterrupt):
            script.main(argv)
    finally:
        monkeypatch.setattr(script, "denoising_loss", real_loss)


def randomize(module: torch.nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Give every parameter random values so a tuner is no longer the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def unet_inputs(unet, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    sample = torch.randn(batch, unet.config.in_channels, size, size, generator=generator)
    context = torch.randn(batch, 8, unet.config.cross_attention_dim, generator=generator)
    timestep = torch.tensor([10, 700][:batch] + [500] * max(0, batch - 2))
    return sample, timestep, context


def run_unet(unet, inputs) -> torch.Tensor:
    sample, timestep, context = inputs
    with torch.no_grad():
        return unet(sample, timestep, encoder_hidden_states=context).sample


@pytest.fixture
def unet():
    return tiny_unet(seed=0)


@pytest.fixture
def inputs(unet):
    return unet_inputs(unet)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=0)
