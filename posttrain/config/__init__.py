"""The `posttrain sft` configuration: one typed dataclass, filled from YAML and CLI flags.

`SFTConfig` is the single source of truth for a run. Its fields (with their help
strings) generate the command-line flags, every value read from a YAML file or a
flag goes through the same type checks and range checks, and the resolved config is
saved next to every checkpoint so that a run can be reproduced and resumed.

Precedence: dataclass defaults < YAML file (`--config FILE`) < explicit CLI flags.

`schema` holds the dataclass, its checks and its YAML form; `args` its flags.
"""

from posttrain.config.flags import add_config_arguments, config_from_args
from posttrain.config.sft import (
    FIELDS,
    HF_NAMES,
    RENAMED,
    REQUIRED_FIELDS,
    SFTConfig,
    config_from_dict,
    config_to_dict,
    key_hint,
    load_config,
    save_config,
)

__all__ = [
    "FIELDS",
    "HF_NAMES",
    "RENAMED",
    "REQUIRED_FIELDS",
    "SFTConfig",
    "add_config_arguments",
    "config_from_args",
    "config_from_dict",
    "config_to_dict",
    "key_hint",
    "load_config",
    "save_config",
]
