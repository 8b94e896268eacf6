"""The factorized-prior entropy bottleneck as compressai <= 1.1 computed and stored it.

The STF repository (Googolxx/STF) bundles its own compressai 1.1.6dev0. Two details of its
``EntropyBottleneck`` differ from compressai 1.2.8 and matter for parity:

* **Likelihood (the "sign trick").** The probability mass of ``[v - 1/2, v + 1/2]`` is computed as
  ``|sigmoid(s * upper) - sigmoid(s * lower)|`` with ``s = -sign(lower + upper)``, where compressai
  >= 1.2 computes ``sigmoid(upper) - sigmoid(lower)``. Mathematically equal; in float32 about a
  third of the z likelihoods differ by up to 1 ulp near 1. ``update()`` builds its pmf the same way.
* **Parameter order.** The density parameters are registered interleaved per layer
  (matrix 0, bias 0, factor 0, matrix 1, ...) *before* ``quantiles``, where compressai 1.2.8 keeps
  three ``ParameterList`` children after its buffers.

:class:`SignTrickEntropyBottleneck` only swaps the likelihood (for the CompressAI-layout models);
:class:`InterleavedEntropyBottleneck` also keeps upstream's parameter order under compressai
1.2.8's names ``matrices.{i}`` / ``biases.{i}`` / ``factors.{i}`` (for the reference models).
"""

from __future__ import annotations

from typing import Any

import torch
from compressai.entropy_models import EntropyBottleneck
from torch import Tensor, nn

__all__ = ["InterleavedEntropyBottleneck", "SignTrickEntropyBottleneck"]


class SignTrickEntropyBottleneck(EntropyBottleneck):
    """compressai 1.2.8's bottleneck with compressai 1.1's likelihood formula."""

    def _likelihood(self, inputs: Tensor, stop_gradient: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        half = 0.5
        lower = self._logits_cumulative(inputs - half, stop_gradient=stop_gradient)
        upper = self._logits_cumulative(inputs + half, stop_gradient=stop_gradient)
        # upstream quirk reproduced on purpose (compressai <= 1.1): evaluate both sigmoids on the side
        # of zero where they are small, then take the absolute difference
        sign = -torch.sign(lower + upper).detach()
        likelihood = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        return likelihood, lower, upper


#: The three kinds of density parameters, in upstream's per-layer order, with compressai 1.2.8's names.
_KINDS = ("matrices", "biases", "factors")


class InterleavedEntropyBottleneck(SignTrickEntropyBottleneck):
    """:class:`SignTrickEntropyBottleneck` whose parameters are listed in compressai 1.1's order.

    The parameters are held directly by this module under the dotted names ``matrices.{i}``,
    ``biases.{i}``, ``factors.{i}`` (interleaved per layer, then ``quantiles``), so ``state_dict()``
    and ``named_parameters()`` give the upstream order with today's spelling; compressai's loader
    maps the legacy ``_matrix{i}`` names onto them.
    """

    def __init__(self, channels: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(channels, *args, **kwargs)
        lists = {kind: self._modules.pop(kind) for kind in _KINDS}
        ordered: dict[str, nn.Parameter] = {}
        for i in range(len(self.filters) + 1):
            for kind in _KINDS:
                if i < len(lists[kind]):
                    ordered[f"{kind}.{i}"] = lists[kind][i]
        ordered.update(self._parameters)  # quantiles after the density parameters, as upstream
        self._parameters.clear()
        self._parameters.update(ordered)

    def __setattr__(self, name: str, value: Any) -> None:
        # loading with assign=True sets parameters by name; the dotted names are ours to keep
        held = self.__dict__.get("_parameters")
        if held is not None and "." in name and name in held:
            held[name] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
            return
        super().__setattr__(name, value)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # torch looks for a child module "matrices" and calls the dotted keys unexpected; they were loaded
        held = {prefix + name for name in self._parameters if "." in name}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in held]

    def _density(self, kind: str, i: int) -> Tensor:
        return self._parameters[f"{kind}.{i}"]

    def _logits_cumulative(self, inputs: Tensor, stop_gradient: bool) -> Tensor:
        logits = inputs
        for i in range(len(self.filters) + 1):
            matrix, bias = self._density("matrices", i), self._density("biases", i)
            if stop_gradient:
                matrix, bias = matrix.detach(), bias.detach()
            logits = torch.matmul(nn.functional.softplus(matrix), logits) + bias
            if i < len(self.filters):
                factor = self._density("factors", i)
                if stop_gradient:
                    factor = factor.detach()
                logits = logits + torch.tanh(factor) * torch.tanh(logits)
        return logits
