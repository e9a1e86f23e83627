"""Named math datasets (hub or local files in the upstream schema) mapped to ``problem`` / ``answer``, and prompts."""

from sfpo_jax.data.loading import DEFAULT_INSTRUCTION, get_spec, load, render_prompt, to_problems
from sfpo_jax.data.specs import SPECS, DatasetFormatError, DatasetSpec

__all__ = [
    "DEFAULT_INSTRUCTION",
    "SPECS",
    "DatasetFormatError",
    "DatasetSpec",
    "get_spec",
    "load",
    "render_prompt",
    "to_problems",
]
