"""The pure formulas of docs/method.md, functions of tensors and numbers only: the time grid (flow,
schedule), the SDE and ODE steps with their log-probabilities and step weights (sde), group
advantages (advantages) and every algorithm's loss (losses)."""
