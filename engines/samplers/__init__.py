"""Few-step samplers as generators over one denoiser contract; see base.py for the protocol."""

from engines.samplers import consistency, ode, stochastic, teleport  # noqa: F401  (registers)
from engines.samplers.base import (
    INFO,
    SAMPLERS,
    SamplerError,
    SamplerGen,
    SamplerInfo,
    cat_cond,
    check_grid,
    check_orders,
    create,
    drive,
    drive_many,
    nfe,
    options,
    split_rows,
)

__all__ = [
    "INFO",
    "SAMPLERS",
    "SamplerError",
    "SamplerGen",
    "SamplerInfo",
    "cat_cond",
    "check_grid",
    "check_orders",
    "create",
    "drive",
    "drive_many",
    "nfe",
    "options",
    "split_rows",
]
