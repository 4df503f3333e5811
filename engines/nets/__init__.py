"""Reference networks: a class-conditional UNet, a small autoencoder and a classifier."""

from engines.nets.autoencoder import Autoencoder, AutoencoderConfig
from engines.nets.classifier import Classifier, ClassifierConfig
from engines.nets.config import ConfigError, config_from_dict, config_to_dict
from engines.nets.unet import UNet, UNetConfig

__all__ = [
    "Autoencoder",
    "AutoencoderConfig",
    "Classifier",
    "ClassifierConfig",
    "ConfigError",
    "UNet",
    "UNetConfig",
    "config_from_dict",
    "config_to_dict",
]
