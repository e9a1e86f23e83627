"""Named math datasets (hub or local files in the upstream schema) mapped to ``problem`` / ``answer``, and prompts."""

from sfpo_jax.data.loading import (
    DEFAULT_INSTRUCTION,
    PROMPTS,
    deduplicate,
    get_spec,
    load,
    prompt_template,
    render_prompt,
    to_problems,
    user_message,
)
from sfpo_jax.data.specs import SPECS, DatasetFormatError, DatasetSpec

__all__ = [
    "DEFAULT_INSTRUCTION",
    "PROMPTS",
    "SPECS",
    "DatasetFormatError",
    "DatasetSpec",
    "deduplicate",
    "get_spec",
    "load",
    "prompt_template",
    "render_prompt",
    "to_problems",
    "user_message",
]
