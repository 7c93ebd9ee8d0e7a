"""The attack networks: a 3-layer MLP for semantic inputs, a small CNN for pixel inputs.

Each is wrapped in ``ScoringHead``: standardisation (statistics of the training split only, stored as buffers) ->
network -> raw score, and Platt calibration -> P(member). The ONNX export is that whole wrapper, so the exported
graph needs nothing from Python to turn an attack input into a probability.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: tuple[int, ...], dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(), nn.Dropout(dropout)]
            prev = h
        layers.append(nn.Linear(prev, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class PixelCNN(nn.Module):
    """One CNN shared over the ``G`` generated images of a query; image features are averaged over G, so the
    score does not depend on the images' order."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], hidden: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i, c in enumerate(channels):
            # The first conv strides by 2 instead of pooling after it: 2.4x faster per epoch at 32x32 with the
            # same validation/test AUC on the toy world's I-P and II-P (measured).
            layers += [nn.Conv2d(prev, c, 3, stride=2 if i == 0 else 1, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            if 0 < i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            prev = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(prev, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, G, C, P, P]
        n, g = x.shape[0], x.shape[1]
        f = self.features(x.reshape(n * g, *x.shape[2:])).mean(dim=(2, 3))
        return self.head(f.reshape(n, g, -1).mean(dim=1)).squeeze(-1)


class FixedScore(nn.Module):
    """An untrained score (a gray-box attack's paper statistic): the input's single column, as it is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 1]
        return x[:, 0]


class ScoringHead(nn.Module):
    """standardise -> network -> (score, probability). ``mean``/``std`` broadcast over the input's feature axes."""

    def __init__(self, net: nn.Module, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        # Platt calibration P = sigmoid(a * score + b); identity-ish until fitted on the validation split.
        self.register_buffer("platt", torch.tensor([1.0, 0.0], dtype=torch.float32))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.score(x)
        return s, torch.sigmoid(self.platt[0] * s + self.platt[1])


def build_net(kind: str, input_shape: tuple[int, ...], mlp_hidden: tuple[int, ...], cnn_channels: tuple[int, ...],
              cnn_hidden: int, dropout: float) -> nn.Module:
    """``input_shape`` excludes the batch axis: (F,) for semantic, (1,) for score, (G, C, P, P) for pixel heads."""
    if kind == "semantic":
        return MLP(int(input_shape[0]), tuple(mlp_hidden), dropout)
    if kind == "pixel":
        return PixelCNN(int(input_shape[1]), tuple(cnn_channels), int(cnn_hidden), dropout)
    if kind in ("score", "calibrated"):
        return FixedScore()
    raise ValueError(f"unknown head kind {kind!r}")


def standardisation(kind: str, x_train: np.ndarray, y_train: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (semantic, score) or per-channel (pixel) mean/std of the training split only; a ``calibrated``
    score's of the training split's non-members only (``y_train`` 0), so it reads as a z-score against them."""
    if kind == "calibrated":
        nonmembers = x_train[np.asarray(y_train) == 0] if y_train is not None else x_train
        x_train = nonmembers if len(nonmembers) > 1 else x_train
    if kind in ("semantic", "score", "calibrated"):
        mean, std = x_train.mean(0), x_train.std(0)
    else:  # [N, G, C, P, P] -> per channel, shaped to broadcast over [G, C, P, P]
        mean = x_train.mean(axis=(0, 1, 3, 4)).reshape(1, -1, 1, 1)
        std = x_train.std(axis=(0, 1, 3, 4)).reshape(1, -1, 1, 1)
    # A constant feature (std 0) carries no information; dividing by 1 keeps it at 0 instead of inf.
    std = np.where(std < 1e-6, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)
