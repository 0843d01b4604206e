"""What every configuration class shares: strictness, and the error the loader raises.

Plug-ins (sources, sinks) declare their own config classes on this base, in their own
module, so adding a source is one file; `config.py` builds the unions from them.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# The stream-id rule, defined once: config ids, ids taken from MQTT topic levels and
# the HTTP API's stream names all follow it.
STREAM_ID_CHARS = r"[A-Za-z0-9_.\-]"
STREAM_ID_PATTERN = rf"^{STREAM_ID_CHARS}+$"


class ConfigError(ValueError):
    """A configuration file that cannot be used; `str()` lists every problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Strict(BaseModel):
    # .inf / .nan are valid YAML floats but no sane interval, rate or threshold;
    # unknown keys are errors (a typo must not silently fall back to a default)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
