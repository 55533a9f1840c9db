"""Names of the flash kernels' saved residuals, for remat (`jax.checkpoint`) policies.

The forward kernels' custom_vjp saves (out, lse) for the backward kernels. Under a remat policy
that saves only matmul outputs, the backward pass would re-run the forward kernel to rebuild
them (~4% of a Janus-Pro-1B step on an H100); a policy that also saves these names keeps them
instead: [B, T, Hq, D] in the compute dtype plus float32 row statistics per layer.

The optimization barrier: when a layer scan stacks these residuals, XLA's GPU dynamic-slice
fusion would clone the forward kernel into a second call that writes straight into the stacked
buffer (measured: the kernel ran twice per layer); behind a barrier the stacking is a copy.
"""
import jax
from jax.ad_checkpoint import checkpoint_name

RESIDUAL_NAMES = ("flash_attention_out", "flash_attention_lse")


def name_residuals(out, lse):
  """(out, lse) tagged with RESIDUAL_NAMES (identity on values)."""
  out, lse = jax.lax.optimization_barrier((out, lse))
  return checkpoint_name(out, RESIDUAL_NAMES[0]), checkpoint_name(lse, RESIDUAL_NAMES[1])
