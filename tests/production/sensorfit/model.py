"""The model: a small 1-D convolutional regressor over windows of multichannel sensor readings."""

from __future__ import annotations

import torch

CHANNELS, WINDOW = 4, 32


class SensorNet(torch.nn.Module):
    """Conv1d -> GELU -> LayerNorm -> pooled MLP head with dropout: predicts one value per window."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(CHANNELS, hidden, kernel_size=5, padding=2)
        self.norm = torch.nn.LayerNorm(hidden)
        self.head = torch.nn.Sequential(
            torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, channels, window)
        features = torch.nn.functional.gelu(self.conv(x)).mean(dim=2)
        return self.head(self.norm(features)).squeeze(1)
