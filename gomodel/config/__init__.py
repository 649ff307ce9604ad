"""Configuration: environment over YAML, read once into one frozen L{Config} of sections.

Layout: L{sections} holds the dataclasses, each section its own table of
settings; L{parsers} the value parsers; L{load} the only reader of the
environment (L{load_config}); L{providers} the provider blocks and
C{<TYPE>_*} variables; L{catalog} the known provider types.
"""

from gomodel.config.catalog import MODELS_MODES, PROVIDER_TYPES, ProviderType
from gomodel.config.errors import ConfigError
from gomodel.config.load import load_config
from gomodel.config.parsers import MAX_WORKERS
from gomodel.config.sections import (
    SECTIONS,
    AuthConfig,
    Config,
    LimitsConfig,
    MetricsConfig,
    PassthroughConfig,
    ProviderConfig,
    ReplicaConfig,
    RoutingConfig,
    ServerConfig,
    Setting,
    StoreConfig,
    Timeouts,
    UpstreamsConfig,
    settings_of,
)

__all__ = [
    "MODELS_MODES", "PROVIDER_TYPES", "ProviderType", "ConfigError", "load_config", "MAX_WORKERS", "SECTIONS",
    "AuthConfig", "Config", "LimitsConfig", "MetricsConfig", "PassthroughConfig", "ProviderConfig", "ReplicaConfig",
    "RoutingConfig", "ServerConfig", "Setting",
    "StoreConfig", "Timeouts", "UpstreamsConfig", "settings_of",
]
