"""The `posttrain sft` configuration: one typed dataclass, filled from YAML and CLI flags.

`SFTConfig` is the single source of truth for a run. Its fields (with their help
strings) generate the command-line flags, every value read from a YAML file or a
flag goes through the same type checks and range checks, and the resolved config is
saved next to every checkpoint so that a run can be reproduced and resumed.

Precedence: dataclass defaults < YAML file (`--config FILE`) < explicit CLI flags.

`spec` is the one layer between any config dataclass and its YAML file and flags
(`ConfigSpec`); `sft` holds `SFTConfig` and its checks, `flags` its command-line form,
`eval` `EvalConfig`, `values` the type coercion they share.
"""

from posttrain.config.flags import add_config_arguments, config_from_args
from posttrain.config.sft import (
    FIELDS,
    RENAMED,
    REQUIRED_FIELDS,
    SFTConfig,
    config_from_dict,
    config_to_dict,
    key_hint,
    save_config,
)
from posttrain.config.spec import HF_NAMES, ConfigSpec, UnknownSettingError, load_config

__all__ = [
    "FIELDS",
    "HF_NAMES",
    "RENAMED",
    "REQUIRED_FIELDS",
    "ConfigSpec",
    "SFTConfig",
    "UnknownSettingError",
    "add_config_arguments",
    "config_from_args",
    "config_from_dict",
    "config_to_dict",
    "key_hint",
    "load_config",
    "save_config",
]
