"""Small network builders shared by models and guides."""

from collections.abc import Sequence

from torch import nn


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU,
        final_activation: bool = False) -> nn.Sequential:
    """A multilayer perceptron ``sizes[0] -> ... -> sizes[-1]``.

    ``nn.Linear`` acts on the last dimension, so the network broadcasts over any
    leading sample and batch dimensions, as Pyro's vectorized particles need.
    """
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2 or final_activation:
            layers.append(activation())
    return nn.Sequential(*layers)
