"""The model repository: reads model_repo/, validates model.yaml, loads and warms up models.

Every model.yaml is read and checked when the Repository is opened, so a typo fails at
start-up with the file and the field in the message, not on the first request.

spec.py       ModelSpec (and SamplingSpec, LatentConsistency), LoadedModel, the errors
model_yaml.py strict model.yaml parsing (parse_model_yaml)
kinds.py      the model kinds and their loaders (each returns Parts)
repository.py Repository: the folders, versions, loading and engine contexts
"""

from engines.repository.kinds import KINDS, NET_KINDS, Kind, Loader, Parts, Wrap, load_weights
from engines.repository.model_yaml import parse_model_yaml
from engines.repository.repository import MODEL_FILE, NAME_PATTERN, Repository, fingerprint
from engines.repository.spec import (
    GRID_CHOICES,
    GridError,
    LatentConsistency,
    LoadedModel,
    ModelNotFoundError,
    ModelSpec,
    RepositoryError,
    SamplingSpec,
    TunedGrid,
)

__all__ = [
    "GRID_CHOICES",
    "KINDS",
    "MODEL_FILE",
    "NAME_PATTERN",
    "NET_KINDS",
    "GridError",
    "Kind",
    "LatentConsistency",
    "LoadedModel",
    "Loader",
    "ModelNotFoundError",
    "ModelSpec",
    "Parts",
    "Repository",
    "RepositoryError",
    "SamplingSpec",
    "TunedGrid",
    "Wrap",
    "fingerprint",
    "load_weights",
    "parse_model_yaml",
]
