"""TrainState: everything a training run carries from step to step, as one explicit pytree.

    state = TrainState.create(params, tx, jax.random.key(0))
    state = state.apply_gradients(grads, tx)

The optimizer `tx` is deliberately *not* a field: it is code (built from the config), not state,
so it is passed to `apply_gradients` and the state stays a plain pytree of arrays that orbax
saves and restores leaf by leaf.

For restoring onto a mesh, `abstract_train_state(params_abstract, tx)` gives the same tree with
`jax.ShapeDtypeStruct(shape, dtype, sharding=...)` leaves: optimizer moments and accumulators
take the sharding of the param they mirror, everything else (step, counts, rng) is replicated.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from unimm_jax.train.optimizer import flatten_with_paths, path_tuple


def _key_data(rng) -> jax.Array:
    """Raw uint32 key data: typed keys (jax.random.key) and legacy uint32 keys both accepted."""
    dtype = getattr(rng, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)


@flax.struct.dataclass
class TrainState:
    """Fields:
      step:      int32 [] optimizer updates taken (calls to `tx.update`).
      params:    nested dict of float32 arrays (the master weights).
      opt_state: optax state for `tx` (frozen params have none; see optimizer.py).
      rng:       uint32 raw PRNG key data ([2] for the default threefry impl); kept raw, not a
                 typed key, so jit, orbax and device_put treat it as an ordinary array.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng, step: int = 0) -> "TrainState":
        """A fresh state: `tx.init(params)`, step as int32, rng stored as raw key data."""
        return cls(step=jnp.asarray(step, jnp.int32), params=params,
                   opt_state=tx.init(params), rng=_key_data(rng))

    def apply_gradients(self, grads, tx: optax.GradientTransformation) -> "TrainState":
        """One `tx.update` + `optax.apply_updates`; step += 1. Grads are shaped like params."""
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state)

    def apply_gradients_if(self, ok: jax.Array, grads, tx: optax.GradientTransformation) -> "TrainState":
        """`apply_gradients` when the bool scalar `ok` holds, else this state unchanged (NaN guard).

        A cond, not a where over old and new states: a skipped step does no optimizer work, and the
        update never needs both states at once to select between them.
        """
        return jax.lax.cond(ok, lambda s: s.apply_gradients(grads, tx), lambda s: s, self)

    def key(self) -> jax.Array:
        """The rng as a typed key (jax.random.key form)."""
        return jax.random.wrap_key_data(self.rng)

    def split_rng(self, num: int = 1):
        """(new_state, keys[num]): advances the stored rng so a key is never reused."""
        keys = jax.random.split(self.key(), num + 1)
        return self.replace(rng=jax.random.key_data(keys[0])), keys[1:]


def _mesh_of(shardings) -> jax.sharding.Mesh | None:
    for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)):
        if isinstance(s, NamedSharding):
            return s.mesh
    return None


def abstract_train_state(params_abstract, tx: optax.GradientTransformation,
                         replicated: jax.sharding.Sharding | None = None) -> TrainState:
    """The TrainState as ShapeDtypeStructs carrying shardings, for `Checkpointer.restore_latest`.

    Args:
      params_abstract: params tree of arrays or ShapeDtypeStructs; their `.sharding` (e.g. from
        `sharding.params_shardings`) is kept. Leaves without one are replicated.
      tx: the optimizer the state is used with (its init defines the opt_state tree).
      replicated: sharding for non-param leaves; defaults to a fully replicated NamedSharding on
        the params' mesh, or the first device when params carry no mesh.
    Returns:
      TrainState whose leaves are jax.ShapeDtypeStruct(shape, dtype, sharding=...).
    """
    flat = flatten_with_paths(params_abstract)
    by_path = {p: (x.shape, getattr(x, "sharding", None)) for p, x in flat}
    if replicated is None:
        mesh = _mesh_of([s for _, s in by_path.values() if s is not None])
        replicated = (NamedSharding(mesh, PartitionSpec()) if mesh is not None
                      else SingleDeviceSharding(jax.devices()[0]))
    shapes = jax.eval_shape(
        lambda p: TrainState.create(p, tx, jax.random.key(0)),
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params_abstract))

    # Optimizer leaves that mirror a param (Adam mu/nu, accumulators) sit at a key path ending in
    # that param's path, with its shape: they take its sharding. Matching on path suffixes works
    # through multi_transform's MaskedNodes, which break optax.tree_map_params' structure match.
    def leaf(kp, x):
        p = path_tuple(kp)
        for i in range(len(p)):
            hit = by_path.get(p[i:])
            if hit is not None and hit[0] == x.shape:
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=hit[1] or replicated)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)

    # Params go through the same matcher: their own path is the full-length suffix.
    return jax.tree_util.tree_map_with_path(leaf, shapes)


def state_shardings(abstract_state) -> Any:
    """The tree of shardings of an abstract (or concrete) state, e.g. for jit out_shardings."""
    return jax.tree.map(lambda x: x.sharding, abstract_state)
