"""The score head shared by the LAION aesthetic predictor and ImageReward.

Both publish a five-layer MLP, ``in -> 1024 -> 128 -> 64 -> 16 -> 1`` with no activations and
dropout after the first three layers; keeping the dropouts as modules keeps the published parameter
names (``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``), so their weight files
load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from tempflow.errors import TempflowError
from tempflow.rewards.loading import one_line


class RewardMLP(nn.Module):
    """(B, in_features) -> (B,) score."""

    def __init__(self, in_features: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)  # (B,)


def load_mlp(sd: dict[str, torch.Tensor], reward: str, prefix: str = "") -> RewardMLP:
    """A RewardMLP from the tensors under ``prefix`` (e.g. 'mlp.'), its input width read from them."""
    own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if "layers.0.weight" not in own:
        raise TempflowError(f"reward {reward!r}: no '{prefix}layers.0.weight' in the weights; "
                            "expected the published MLP head (layers.0 ... layers.7)")
    mlp = RewardMLP(own["layers.0.weight"].shape[1])
    try:
        mlp.load_state_dict(own)
    except RuntimeError as e:
        raise TempflowError(f"reward {reward!r}: the MLP head weights do not fit: {one_line(e)}") from None
    return mlp.eval()
