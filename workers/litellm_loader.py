"""The only place that imports litellm.

litellm fetches a model price map from the network when imported unless
`LITELLM_LOCAL_MODEL_COST_MAP=True` is set first; a gateway must start offline and deterministically.
Importing it lazily also keeps its ~3 s import off `frugal --help` and off processes that never call
a litellm backend.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType


def load_litellm() -> ModuleType:
    """Import litellm with its network and telemetry side effects switched off."""
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    os.environ.setdefault("LITELLM_LOG", "ERROR")
    import litellm  # noqa: PLC0415  (deliberately lazy, see module docstring)

    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
        logging.getLogger(name).setLevel(logging.WARNING)  # it logs every call at INFO
    litellm.telemetry = False
    litellm.suppress_debug_info = True
    # Never silently drop a parameter the client asked for: the gateway validates them itself.
    litellm.drop_params = False
    return litellm
