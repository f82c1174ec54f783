"""The watermark decoder tuner: additive updates of the decoder's weights, mergeable into a plain VAE."""

from __future__ import annotations

import torch
from torch import nn

from ...core.errors import BackboneMismatchError
from ...core.tuner import Tuner
from ...sites.vae import decoder_layers, functional_forward, override_forward, restore_forward
from .config import WatermarkConfig


def _key(layer: str, param: str) -> str:
    return f"{layer}.{param}".replace(".", "__")


class WatermarkTuner(Tuner):
    """One zero-initialised delta per parameter of every tuned decoder layer; a tuned layer runs with
    ``weight + scale * delta``. Training the deltas is training the decoder (Stable Signature fine-tunes the
    whole decoder; PAS leaves ``config.frozen_layers`` out). :meth:`merge` writes the weights into the VAE."""

    config_class = WatermarkConfig

    def __init__(self, config: WatermarkConfig, vae: nn.Module):
        super().__init__(config)
        layers = decoder_layers(vae, config.include_post_quant_conv)
        frozen = set(config.frozen_layers or ())
        unknown = sorted(frozen - set(layers))
        if unknown:
            raise BackboneMismatchError(f"frozen_layers {unknown} are not decoder layers of {type(vae).__name__}; "
                                        f"e.g. {sorted(layers)[:4]}")
        self.tuned = [name for name in layers if name not in frozen]
        if not self.tuned:
            raise BackboneMismatchError("every decoder layer is frozen; nothing left to tune")
        self.deltas = nn.ParameterDict()
        for name in self.tuned:
            for pname, param in layers[name].named_parameters(recurse=False):
                self.deltas[_key(name, pname)] = nn.Parameter(torch.zeros_like(param, dtype=torch.float32))
        self.layout = {"num_bits": config.num_bits,
                       "tuned": {name: {p: list(t.shape) for p, t in layers[name].named_parameters(recurse=False)}
                                 for name in self.tuned}}

    def install(self, vae: nn.Module) -> None:
        layers = decoder_layers(vae, self.config.include_post_quant_conv)
        for name in self.tuned:
            module = layers[name]
            override_forward(module, functional_forward(module, self._params_for(name, module)))

    def uninstall(self, vae: nn.Module) -> None:
        layers = decoder_layers(vae, self.config.include_post_quant_conv)
        for name in self.tuned:
            restore_forward(layers[name])

    def _params_for(self, name: str, module: nn.Module):
        names = [p for p, _ in module.named_parameters(recurse=False)]

        def params() -> dict[str, torch.Tensor]:
            out = {}
            for pname in names:
                weight = getattr(module, pname)
                delta = self.deltas[_key(name, pname)]
                out[pname] = weight if self.scale == 0 else weight + (self.scale * delta).to(weight.dtype)
            return out

        return params

    @torch.no_grad()
    def merge(self, vae: nn.Module) -> None:
        layers = decoder_layers(vae, self.config.include_post_quant_conv)
        for name in self.tuned:
            for pname, param in layers[name].named_parameters(recurse=False):
                param.add_((self.scale * self.deltas[_key(name, pname)]).to(param.dtype))
