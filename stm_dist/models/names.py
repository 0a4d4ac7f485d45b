"""Model-name aliases: another mixer name for the same models (`unified_halonet_tiny` is
`unified_halo_tiny`). The registry fills the table; it lives apart so the checkpoint loader can
compare the model a file names with its own without importing the registry (and the models)."""
from typing import Dict

ALIASES: Dict[str, str] = {}  # "unified_halonet_" -> "unified_halo_"


def unalias(name: str) -> str:
    """`name` with a registered alias prefix replaced by its mixer's own; other names unchanged."""
    for alias, canonical in ALIASES.items():
        if name.startswith(alias):
            return canonical + name[len(alias):]
    return name
