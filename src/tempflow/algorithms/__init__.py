"""Algorithm registry: `algorithm.name` in a config picks one.

==================  ==========================================================================
``tempflow_grpo``   TempFlow-GRPO: branching rollouts, seed groups, noise-aware weighting
``flow_grpo``       Flow-GRPO, with SDE windows (MixGRPO), Flow-GRPO-Fast and GRPO-Guard as options
``nft``             DiffusionNFT: negative-aware fine-tuning on the forward process
``awm``             AWM: advantage-weighted matching
``tempflow_nft``    TempFlow's branch credit (per-step rewards from seed groups) with a forward-process loss
==================  ==========================================================================

A name outside the registry is read as a dotted path ``package.module:Class`` to a subclass of
`Algorithm`; a module passed to ``tempflow train --import`` may also add to ``ALGORITHMS``.
docs/extending.md shows a new algorithm in one module and a preset.
"""

from __future__ import annotations

import importlib

from tempflow.algorithms.awm import AWM
from tempflow.algorithms.base import Algorithm, AlgorithmConfig, Batch, Policy, Units
from tempflow.algorithms.flow_grpo import FlowGRPO
from tempflow.algorithms.nft import NFT
from tempflow.algorithms.tempflow_grpo import TempFlowGRPO
from tempflow.algorithms.tempflow_nft import TempFlowNFT
from tempflow.errors import ConfigError

__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmConfig", "Batch", "Policy", "Units", "algorithm_class"]

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (TempFlowGRPO, FlowGRPO, NFT, AWM, TempFlowNFT)
}


def algorithm_class(name: str) -> type[Algorithm]:
    """The registered algorithm `name`, or the class a dotted path `package.module:Class` names."""
    if name in ALGORITHMS:
        return ALGORITHMS[name]
    if ":" not in name:
        raise ConfigError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}, or give a dotted "
                          "path package.module:Class to your own")
    module, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except Exception as e:  # ImportError, AttributeError, or an error inside the module: one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"algorithm {name!r} cannot be imported ({first}); the module must be importable "
                          "(on PYTHONPATH or in the current folder) and define the class") from None
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise ConfigError(f"algorithm {name!r} is not a subclass of tempflow.algorithms.Algorithm")
    return cls


def options_of(key: str) -> list[str]:
    """Names of the registered algorithms whose config section has option `key`."""
    return [n for n, cls in ALGORITHMS.items() if key in cls.Config.__dataclass_fields__]
