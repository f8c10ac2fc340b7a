"""A Mamba-2 language model as a Flax NNX module on this package's kernels:

    embedding -> num_layers x (RMSNorm -> MambaMixer2 -> residual add) -> RMSNorm -> LM head

The residual stream is float32 when the config says so (``residual_in_fp32``,
as mamba_ssm and Hugging Face keep it); each norm reads it cast to the
weights' dtype. Both RMSNorms run on the gated-norm kernel without a gate
(``rms_norm_gated(x, weight, z=None)``).

- ``Mamba2LMHeadModel.from_pretrained(path, dtype)``: a local checkpoint
  directory in mamba_ssm's or Hugging Face's layout (``bridge.spec.lm_config``;
  safetensors only: ``pytorch_model.bin`` needs torch).
- ``model(input_ids, attention_mask=None)`` -> logits: the mixers' cache-free
  forward, differentiable (``nnx.grad``) and jittable.
- ``model.generate(...)``: prefill (the chunked scan, through the mixers'
  serving forward, one jitted call), then the whole decode loop in one
  jitted ``lax.while_loop`` (the state update; sampling inside; no
  per-token dispatch). The states are the model's own arrays, or a
  ``bridge.MambaStateCache`` given to ``prefill`` (or prefilled by a
  ``torch_impl.Mamba2LMHeadModel``), updated in place through the bridge.

Mirror: ``torch_impl/mamba2_lm.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from bridge.spec import lm_config
from bridge.spec.checks import fail
from bridge.spec.lm_config import LMLayout, Mamba2Config, Prefilled, SamplingParams
from jax_impl import platform
from jax_impl.gated_rms_norm import rms_norm_gated
from jax_impl.mamba_mixer2 import MambaMixer2, _linear
from jax_impl.tp import put as tp_put

OP = lm_config.OP


class RMSNorm(platform.CountsAssignments, nnx.Module):
    """``x (..., hidden)`` -> ``x / sqrt(mean(x^2) + eps) * weight``, on the gated-norm kernel without gate."""

    def __init__(self, hidden_size: int, eps: float, dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((hidden_size,), dtype))

    def __call__(self, x):
        flat = x.reshape(-1, x.shape[-1])
        return rms_norm_gated(flat, self.weight[...], eps=self.eps).reshape(x.shape)

    def add_and_norm(self, x, residual):
        """Inference, ``x, residual (T, hidden)``: ``(norm(x + residual) in x's
        dtype, x + residual)``; one kernel."""
        return rms_norm_gated(x, self.weight[...], eps=self.eps, residual=residual)


class Mamba2Block(platform.CountsAssignments, nnx.Module):
    """``norm`` then ``mixer``; the model adds the residual."""

    def __init__(self, config: Mamba2Config, dtype, rngs: nnx.Rngs, tp: dict):
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, dtype)
        self.mixer = MambaMixer2(**config.mixer_args(), dtype=dtype, rngs=rngs, **tp)


def _load_bin(file: str):
    fail(OP, "path", f"holds only {file}, which needs torch to read: load it with "
                     "torch_impl.Mamba2LMHeadModel, or convert it to model.safetensors")


class Mamba2LMHeadModel(platform.CountsAssignments, LMLayout, nnx.Module):
    """A Mamba-2 language model (``bridge.spec.lm_config.Mamba2Config``).
    Parameters: ``embedding (vocab, hidden)``, ``layers[i].norm.weight``,
    ``layers[i].mixer.*`` (``MambaMixer2``'s), ``norm_f.weight``, ``lm_head
    (vocab, hidden)`` (None when tied: the head is the embedding).
    ``load_weights`` / ``checkpoint_weights``: ``lm_config.LMLayout``'s.

    Tensor parallelism (``mesh`` / ``tp_axis``, as ``MambaMixer2`` takes
    them): the mixers are sharded over the axis, the rest replicated on the
    mesh; the states (``new_states``) are sharded as the mixers say."""

    def __init__(self, config: Mamba2Config, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None, *,
                 mesh=None, tp_axis: str = "tp"):
        rngs = rngs or nnx.Rngs(0)
        self.mesh = mesh
        self.config = config
        shape = (config.vocab_size, config.hidden_size)
        self.embedding = nnx.Param((0.02 * jax.random.normal(rngs.params(), shape)).astype(dtype))
        tp = dict(mesh=mesh, tp_axis=tp_axis)
        self.layers = nnx.List([Mamba2Block(config, dtype, rngs, tp) for _ in range(config.num_layers)])
        self.norm_f = RMSNorm(config.hidden_size, config.norm_eps, dtype)
        bound = 1.0 / np.sqrt(config.hidden_size)
        self.lm_head = None if config.tie_embeddings else nnx.Param(
            jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound).astype(dtype))
        if mesh is not None:  # the rest replicated on the mesh
            for param in self._params_by_key().values():
                param.set_value(tp_put(param[...], NamedSharding(mesh, PartitionSpec())))

    # --- weights ---------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=jnp.float32, **tp) -> "Mamba2LMHeadModel":
        """The model of the checkpoint directory ``path`` (``config.json`` and
        ``model.safetensors`` or its shards, in mamba_ssm's or Hugging Face's
        layout), its parameters in ``dtype`` (``A_log`` stays float32);
        ``mesh`` / ``tp_axis``: sharded. Nothing is downloaded."""
        from safetensors.flax import load_file

        config, weights = lm_config.load_pretrained(path, load_file, _load_bin)
        model = cls(config, dtype=dtype, **tp)
        model.load_weights(weights)
        return model

    def _assign(self, param, value) -> None:
        from bridge.dlpack import to_jax

        value = jnp.asarray(value) if isinstance(value, (jax.Array, np.ndarray)) else to_jax(
            value, copy_ok=True, name="weight")
        value = value.astype(param.dtype)
        param.set_value(value if self.mesh is None else tp_put(value, NamedSharding(self.mesh, PartitionSpec())))

    @staticmethod
    def _read(param):
        return param[...]

    @property
    def dtype(self):
        return self.embedding.dtype

    # --- forward ---------------------------------------------------------------

    def __call__(self, input_ids, attention_mask=None):
        """``input_ids (batch, seqlen)`` -> logits ``(batch, seqlen, vocab)`` in
        the weights' dtype, differentiable and jittable. ``attention_mask
        (batch, seqlen)`` (1 token, 0 padding; right or left padding) must be
        concrete (numpy, or closed over under jit): padding never reaches a
        token's state, so the tokens' logits equal those of the unpadded
        rows (padding rows' logits are unspecified)."""
        if attention_mask is not None and not platform.is_concrete(attention_mask):
            fail(OP, "attention_mask", "must be concrete (numpy, or closed over under jit, not traced): "
                                       "the padding decides the scan's chunk layout")
        mask = None if attention_mask is None else np.asarray(attention_mask)
        packing = lm_config.padding_packing(tuple(input_ids.shape), mask)
        residual = self._embed(input_ids)
        for block in self.layers:
            residual = residual + block.mixer(block.norm(residual.astype(self.dtype)), **packing)
        return self._logits(self.norm_f(residual.astype(self.dtype)))

    def _embed(self, input_ids):
        residual = self.embedding[...][input_ids]
        return residual.astype(jnp.float32) if self.config.residual_in_fp32 else residual

    def _logits(self, hidden):
        return _linear(hidden, self.embedding if self.lm_head is None else self.lm_head, None)

    def _serve(self, token_ids, states: tuple, metadata):
        """The serving forward: packed ``token_ids (T,)`` and ``states`` (conv,
        ssm of every layer in turn) -> (final normed hidden ``(T, hidden)``,
        new states)."""
        residual, new_states = self._embed(token_ids), []
        hidden = self.layers[0].norm(residual.astype(self.dtype))  # the embedding: exact in that dtype
        next_norms = [block.norm for block in self.layers[1:]] + [self.norm_f]
        for i, (block, norm) in enumerate(zip(self.layers, next_norms)):
            out, conv, ssm = block.mixer(hidden, states[2 * i], states[2 * i + 1], metadata)
            hidden, residual = norm.add_and_norm(out, residual)
            new_states += [conv, ssm]
        return hidden, tuple(new_states)

    # --- generation ------------------------------------------------------------

    def new_states(self, batch_size: int, state_dtype=jnp.float32) -> tuple:
        """Zero states for ``batch_size`` requests (``batch_size + 1`` blocks:
        block 0 is the null block): conv, ssm of every layer in turn (sharded:
        laid out by the mixers' ``state_shardings()``)."""
        mixer = self.layers[0].mixer
        blocks, layers = batch_size + 1, self.config.num_layers
        if self.mesh is None:
            shapes, shardings = mixer.get_state_shape(), None
        else:
            shapes, shardings = mixer.global_state_shape(), tuple(mixer.state_shardings()) * layers
        return _zeros(tuple((blocks, *shape) for shape in shapes) * layers, state_dtype, shardings)()

    def new_cache(self, batch_size: int, state_dtype: str = "float32", owner: str = "torch",
                  device: str = "cpu"):
        """A ``bridge.MambaStateCache`` for ``batch_size`` requests of this model
        (``batch_size + 1`` blocks), to share with a torch model (needs torch)."""
        import bridge

        return bridge.MambaStateCache(self.layers[0].mixer.get_state_shape(), state_dtype, batch_size + 1,
                                      num_layers=self.config.num_layers, owner=owner, device=device)

    def _run(self, body, cache, *args):
        """``body(states, model, *args)`` -> ``(result, *new_states)``, jitted
        with the states donated, on ``cache``: the model's own states (a
        tuple), or a ``bridge.MambaStateCache`` updated in place through the
        bridge. Returns (result, new cache)."""
        jitted, model = self._jitted_on_leaves(body)
        if isinstance(cache, tuple):
            result, *states = jitted(cache, model, *args)
            return result, tuple(states)
        import bridge

        if not isinstance(cache, bridge.MambaStateCache):
            fail(OP, "cache", f"must be a bridge.MambaStateCache or the model's states, got {type(cache).__name__}")
        tensors = [cache.torch(name, layer) for layer in range(self.config.num_layers) for name in ("conv", "ssm")]
        count = len(tensors)
        step = bridge.jax_step_into(tensors, lambda *a: jitted(a[:count], *a[count:]), model, *args,
                                    state_outputs=tuple(range(1, count + 1)))
        return step.outputs[0], cache

    def _jitted_on_leaves(self, body):
        """``(jitted body, model argument)``: the body on the model's leaves
        (``_Flat``), or, where they cannot be cached, on the model itself."""
        flat = _FLAT.get(self)
        if flat is None or not flat.valid_for(self):
            flat = _FLAT[self] = _Flat.of(self)
        if flat.variables is None:
            return _jitted(body, None), self
        # The raw values: what jax.tree.flatten gives (get_value's hooks cost 10 us per variable).
        return _jitted(body, flat.treedef), [v.get_raw_value() for v in flat.variables]

    def prefill(self, input_ids, attention_mask=None, cache=None) -> Prefilled:
        """Run the prompts (``input_ids (batch, seqlen)``, ``attention_mask`` as
        in ``__call__``; prompts of different lengths) through the chunked scan
        (one jitted call) into slots ``1 .. batch`` of ``cache`` (a
        ``bridge.MambaStateCache``: a torch model can continue; default: new
        states of the model's own). Returns a ``Prefilled`` for
        ``generate(prefilled=...)`` of either framework's model."""
        ids = np.asarray(input_ids)
        starts, lengths = lm_config.prompt_layout(ids.shape, None if attention_mask is None
                                                  else np.asarray(attention_mask), op=f"{OP}.prefill")
        if (lengths == 0).any():
            fail(f"{OP}.prefill", "attention_mask", f"leaves rows {np.flatnonzero(lengths == 0).tolist()} "
                                                    "without tokens; every prompt needs one")
        batch = len(lengths)
        body, bucket = _prefill, lm_config.batch_bucket(batch)
        if cache is None and self.mesh is None:  # zero states made inside the jitted prefill
            body, cache, num_blocks = _prefill_on_zero_states(bucket + 1), (), bucket + 1
        else:
            cache = self.new_states(bucket) if cache is None else cache
            num_blocks = cache[0].shape[0] if isinstance(cache, tuple) else cache.num_blocks
        slots = lm_config.allocate_slots(batch)
        lm_config.check_slots_fit(slots, num_blocks, f"{OP}.prefill")
        # int32 on the host: the jitted call copies it over (an eager jnp cast costs a dispatch).
        tokens = np.concatenate([ids[r, s:s + n] for r, (s, n) in enumerate(zip(starts, lengths))]
                                ).astype(np.int32)
        metadata, last_rows = _prefill_inputs(tuple(lengths.tolist()), tuple(slots.tolist()),
                                              self.config.chunk_size)
        logits, cache = self._run(body, cache, tokens, metadata, last_rows)
        return Prefilled(cache=cache, slots=slots, logits=logits)

    def generate(self, input_ids=None, max_new_tokens: int = 20, attention_mask=None, *,
                 temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 seed: Optional[int] = None, eos_token_id: Optional[int] = None,
                 callback: Optional[Callable] = None, prefilled: Optional[Prefilled] = None):
        """Generate ``max_new_tokens`` tokens after each prompt: returns the new
        tokens ``(batch, max_new_tokens)`` (int32), ``eos_token_id`` after a
        row's end of sequence.

        Greedy (``temperature`` 0, the default), or sampled from
        ``softmax(logits / temperature)`` restricted to the ``top_k`` most
        likely tokens and the smallest set of them whose probability reaches
        ``top_p``, with ``jax.random.key(seed)`` (same seed, same tokens).
        ``callback(step, tokens (batch,) numpy)`` streams each step's tokens
        (``jax.debug.callback``, ordered). Continue a prefill of either
        framework with ``prefilled=`` instead of ``input_ids``.

        The decode loop is one jitted ``lax.while_loop`` (compiled once per
        batch bucket, sampling options and callback), stopping early once
        every row produced ``eos_token_id``."""
        params = lm_config.check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                          top_p=top_p, seed=seed, eos_token_id=eos_token_id,
                                          vocab_size=self.config.vocab_size)
        if (input_ids is None) == (prefilled is None):
            fail(f"{OP}.generate", "input_ids", "or `prefilled` must be given (exactly one of them)")
        if prefilled is None:
            prefilled = self.prefill(input_ids, attention_mask)
        prefilled.consume(f"{OP}.generate")
        batch = len(prefilled.slots)
        if params.max_new_tokens == 0:
            return jnp.full((batch, 0), params.eos_token_id or 0, jnp.int32)
        logits = prefilled.logits
        if not isinstance(logits, jax.Array):
            from bridge.dlpack import to_jax
            logits = to_jax(logits, copy_ok=True, name="prefilled.logits")
        metadata = lm_config.decode_metadata(prefilled.slots, lm_config.batch_bucket(batch),
                                             self.config.chunk_size)
        tokens, prefilled.cache = self._run(_decode(params, callback), prefilled.cache, logits, metadata,
                                            jax.random.key(params.seed))
        return tokens


def _sample(logits, params: SamplingParams, key):
    """``logits (batch, vocab)`` -> tokens ``(batch,)`` int32 (see ``generate``)."""
    logits = logits.astype(jnp.float32)
    if params.greedy:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, params.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if params.top_p is not None and params.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        drop = jnp.cumsum(probs, -1) - probs >= params.top_p  # the tokens past the first reaching top_p
        rows = jnp.arange(logits.shape[0])[:, None]
        logits = jnp.where(jnp.zeros(logits.shape, bool).at[rows, order].set(drop), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# The jitted functions take the model's leaves, not the model: jit's own
# flattening of an nnx module runs in Python (about 1 ms per call for a
# 2.7B-shaped model of 16 layers, most of a prefill's host time). A model's
# flattening is cached while it provably stands (``_Flat.valid_for``); the
# leaves themselves are read from its variables on every call.

_FLAT = weakref.WeakKeyDictionary()  # model -> _Flat


@dataclasses.dataclass
class _Flat:
    """``jax.tree.flatten(model)``'s treedef and the variable behind each
    leaf (``variables`` None: a leaf without its own variable; not cached)."""

    assignments: int  # platform.assignments() when flattened
    layers: tuple  # the layer modules (held: an id could be reused)
    treedef: object
    variables: Optional[list]

    @classmethod
    def of(cls, model) -> "_Flat":
        leaves, treedef = jax.tree.flatten(model)
        owners = {id(v.get_raw_value()): v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
        variables = [owners.get(id(leaf)) for leaf in leaves]
        unique = len({id(v) for v in variables}) == len(variables)
        return cls(platform.assignments(), tuple(model.layers), treedef,
                   variables if unique and None not in variables else None)

    def valid_for(self, model) -> bool:
        """No attribute of this package's modules assigned since, the same
        layers: the same structure (a variable's new value is read anyway)."""
        layers = tuple(model.layers)
        return (self.assignments == platform.assignments() and len(layers) == len(self.layers)
                and all(a is b for a, b in zip(layers, self.layers)))


@functools.lru_cache(maxsize=64)
def _jitted(body, treedef):
    """``body(states, model, *args)`` jitted with the states donated, taking
    the model's leaves of ``treedef`` in place of the model (the model
    itself when ``treedef`` is None)."""
    if treedef is None:
        return jax.jit(body, donate_argnums=0)
    return jax.jit(lambda states, leaves, *args: body(states, jax.tree.unflatten(treedef, leaves), *args),
                   donate_argnums=0)


@functools.lru_cache(maxsize=16)
def _zeros(shapes: tuple, dtype, shardings):
    """One jitted call making zero arrays of ``shapes`` (placed by ``shardings``
    when given): one dispatch, not one per array."""
    return jax.jit(lambda: tuple(jnp.zeros(shape, dtype) for shape in shapes), out_shardings=shardings)


@functools.lru_cache(maxsize=8)
def _prefill_inputs(lengths: tuple, slots: tuple, chunk_size: int):
    """The prefill metadata of prompts of ``lengths`` into ``slots`` and each
    prompt's last row ``(batch,)``, on the device: built and copied once
    per prompt layout, not per prefill."""
    lengths = np.asarray(lengths)
    metadata = lm_config.prefill_metadata(lengths, np.asarray(slots, np.int32), chunk_size)
    return metadata.map_arrays(jnp.asarray), jnp.asarray(np.cumsum(lengths) - 1, jnp.int32)


def _prefill(states, model, tokens, metadata, last_rows):
    """The prefill of every layer: ``(states, model, tokens (T,), metadata,
    last_rows (batch,))`` -> ``(logits, *states)``."""
    hidden, states = model._serve(tokens, states, metadata)
    return (model._logits(hidden[last_rows]), *states)


@functools.lru_cache(maxsize=8)
def _prefill_on_zero_states(blocks: int):
    """``_prefill`` on float32 zero states of ``blocks`` blocks made inside
    the jitted call (its ``states`` argument empty): no separate dispatch."""
    def body(no_states, model, tokens, metadata, last_rows):
        shapes = model.layers[0].mixer.get_state_shape()
        zeros = tuple(jnp.zeros((blocks, *shape), jnp.float32) for shape in shapes) * model.config.num_layers
        return _prefill(zeros, model, tokens, metadata, last_rows)

    return body


@functools.lru_cache(maxsize=64)
def _decode(sampling: SamplingParams, callback):
    """The whole decode loop: ``(states, model, logits (batch, vocab),
    metadata, key)`` -> ``(tokens (batch, n), *states)``."""
    n, eos = sampling.max_new_tokens, sampling.eos_token_id

    def pick(logits, key, done, step):
        """The next tokens, eos after a row's end; streamed to the callback."""
        key, sub = jax.random.split(key)
        token = _sample(logits, sampling, sub)
        if eos is not None:
            token = jnp.where(done, eos, token)
            done = done | (token == eos)
        if callback is not None:
            jax.debug.callback(lambda i, t: callback(int(i), np.asarray(t)), step, token, ordered=True)
        return token, key, done

    def decode(states, model, logits, metadata, key):
        batch = logits.shape[0]
        token, key, done = pick(logits, key, jnp.zeros(batch, bool), 0)
        out = jnp.full((batch, n), 0 if eos is None else eos, jnp.int32).at[:, 0].set(token)

        def running(carry):
            step, done = carry[0], carry[2]
            return (step < n) & ~jnp.all(done)

        def body(carry):
            step, token, done, out, states, key = carry
            ids = jnp.zeros(metadata.num_decodes, jnp.int32).at[:batch].set(token)
            hidden, states = model._serve(ids, states, metadata)
            token, key, done = pick(model._logits(hidden[:batch]), key, done, step)
            return step + 1, token, done, out.at[:, step].set(token), states, key

        carry = jax.lax.while_loop(running, body, (1, token, done, out, states, key))
        return (carry[3], *carry[4])

    return decode
