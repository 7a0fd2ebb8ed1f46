import torch

from tempflow.math.flow import sigma_grid
from tempflow.models.base import Conditioning
from tempflow.sampling import ode_sample


class StraightLineModel:
    """The exact velocity field of a one-point data distribution x0: v = (x - x0) / t."""

    def __init__(self, x0: torch.Tensor) -> None:
        self.x0 = x0
        self.times: list[float] = []

    def velocity(self, x, t, cond, guidance):
        self.times.append(float(t[0]))
        return (x - self.x0) / t.reshape(-1, 1, 1, 1)

    def sigmas(self, n):
        return sigma_grid(n, 3.0)


def test_ode_sampling_follows_the_grid_and_reaches_the_data():
    x0 = torch.randn(2, 3, 4, 4)
    model = StraightLineModel(x0)
    cond = Conditioning(torch.zeros(2, 1, 1), torch.zeros(2, 1))
    out = ode_sample(model, torch.randn(2, 3, 4, 4), cond, num_steps=10, guidance=1.0)
    assert torch.allclose(out, x0, atol=1e-5)
    assert torch.allclose(torch.tensor(model.times), sigma_grid(10, 3.0)[:-1])
