"""A one-off check (session 9, run by s9_call2.sh from .whl/s9/; kept as the record):
attention_check at the shapes given, with attend_fused's self-slot rule removed (the code
the H200 run of session 7 measured), to see whether the NaN comes back on this GPU."""
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, "experiments")
from sfpo_jax.models import transformer


def without_self_slot(q, k, v, mask, dtype, implementation="cudnn"):
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation).astype(jnp.float32)

transformer.attend_fused = without_self_slot
import attention_check  # noqa: E402 (after the patch above)

attention_check.main(sys.argv[1:])
