"""A Mamba-2 language model as a PyTorch module on this package's kernels:

    embedding -> num_layers x (RMSNorm -> MambaMixer2 -> residual add) -> RMSNorm -> LM head

The residual stream is float32 when the config says so (``residual_in_fp32``,
as mamba_ssm and Hugging Face keep it); each norm reads it cast to the
weights' dtype. Both RMSNorms run on the gated-norm kernel without a gate
(``rms_norm_gated(x, weight, z=None)``).

- ``Mamba2LMHeadModel.from_pretrained(path, dtype, device)``: a local
  checkpoint directory in mamba_ssm's or Hugging Face's layout
  (``bridge.spec.lm_config``).
- ``model(input_ids, attention_mask=None)`` -> logits: the mixers' cache-free
  forward, differentiable.
- ``model.generate(...)``: prefill (the chunked scan, through the mixers'
  serving forward) into a ``bridge.MambaStateCache`` whose slots the model
  allocates, then decode steps (the state update), captured in a CUDA graph
  per batch-size bucket on CUDA. ``prefill`` and ``generate(prefilled=...)``
  split the two, so a ``jax_impl.Mamba2LMHeadModel`` can continue a
  generation this model prefilled on the same cache, and the reverse.

Mirror: ``jax_impl/mamba2_lm.py``.
"""

from __future__ import annotations

import collections
import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bridge.spec import lm_config
from bridge.spec.checks import fail
from bridge.spec.lm_config import LMLayout, Mamba2Config, Prefilled, SamplingParams
from torch_impl import platform
from torch_impl.gated_rms_norm import rms_norm_gated
from torch_impl.mamba_mixer2 import MambaMixer2, metadata_to_device

OP = lm_config.OP
MAX_CAPTURED_STEPS = 8  # decode graphs kept (each pins its cache)


class RMSNorm(nn.Module):
    """``x (..., hidden)`` -> ``x / sqrt(mean(x^2) + eps) * weight``, on the gated-norm kernel without gate."""

    def __init__(self, hidden_size: int, eps: float, dtype=torch.float32, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return rms_norm_gated(flat, self.weight, eps=self.eps).reshape(x.shape)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference, ``x, residual (T, hidden)``: ``(norm(x + residual) in x's
        dtype, x + residual)``, the sum written into ``residual``; one kernel."""
        return rms_norm_gated(x, self.weight, eps=self.eps, residual=residual, residual_out=residual)


class Mamba2Block(nn.Module):
    """``norm`` then ``mixer``; the model adds the residual."""

    def __init__(self, config: Mamba2Config, dtype, device, tp: dict):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, dtype, device)
        self.mixer = MambaMixer2(**config.mixer_args(), dtype=dtype, device=device, **tp)


def _load_bin(file: str) -> dict:
    return torch.load(file, map_location="cpu", weights_only=True)


class Mamba2LMHeadModel(LMLayout, nn.Module):
    """A Mamba-2 language model (``bridge.spec.lm_config.Mamba2Config``).
    Parameters: ``embedding (vocab, hidden)``, ``layers[i].norm.weight``,
    ``layers[i].mixer.*`` (``MambaMixer2``'s), ``norm_f.weight``, ``lm_head
    (vocab, hidden)`` (None when tied: the head is the embedding).
    ``load_weights`` / ``checkpoint_weights``: ``lm_config.LMLayout``'s.

    Tensor parallelism (``tp_size`` / ``process_group``, as ``MambaMixer2``
    takes them): the mixers are sharded, the rest replicated; every rank
    runs the same calls on the same inputs and gets the same results.

    ``prefill_graphs``: how many prompt layouts (the prompts' lengths) keep
    a captured prefill (CUDA, no tensor parallelism): a layout's second
    prefill is captured in a CUDA graph and later ones replay it, without
    the host's per-layer work; each graph holds one prefill's activations.
    0: every prefill runs eagerly."""

    prefill_graphs: int = 2

    def __init__(self, config: Mamba2Config, dtype=torch.float32, device=None, *, tp_size=None,
                 process_group=None):
        nn.Module.__init__(self)
        self.config = config
        shape, factory = (config.vocab_size, config.hidden_size), dict(dtype=dtype, device=device)
        self.embedding = nn.Parameter(0.02 * torch.randn(shape, **factory))
        tp = dict(tp_size=tp_size, process_group=process_group)
        self.layers = nn.ModuleList(Mamba2Block(config, dtype, device, tp) for _ in range(config.num_layers))
        self.norm_f = RMSNorm(config.hidden_size, config.norm_eps, dtype, device)
        bound = 1.0 / math.sqrt(config.hidden_size)
        self.lm_head = None if config.tie_embeddings else nn.Parameter(
            torch.empty(shape, **factory).uniform_(-bound, bound))
        # Generation: the model's own cache per batch bucket, captured decode
        # steps and the prefills of the last prompt layouts (see _prefill_layout).
        self._caches: dict = {}
        self._steps: collections.OrderedDict = collections.OrderedDict()
        self._prefills: collections.OrderedDict = collections.OrderedDict()

    # --- weights ---------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device=None, **tp) -> "Mamba2LMHeadModel":
        """The model of the checkpoint directory ``path`` (``config.json`` and
        ``model.safetensors`` / its shards / ``pytorch_model.bin``, in
        mamba_ssm's or Hugging Face's layout), its parameters in ``dtype``
        (``A_log`` stays float32) on ``device``; ``tp_size`` / ``process_group``:
        sharded (each rank loads its shards). Nothing is downloaded."""
        from safetensors.torch import load_file

        config, weights = lm_config.load_pretrained(path, load_file, _load_bin)
        model = cls(config, dtype=dtype, device=device, **tp)
        model.load_weights(weights)
        return model

    @staticmethod
    def _assign(param, value) -> None:
        from bridge.dlpack import to_torch

        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        elif not isinstance(value, torch.Tensor):
            value = to_torch(value, copy_ok=True, name="weight")
        with torch.no_grad():
            param.copy_(value)

    @staticmethod
    def _read(param):
        return param.detach()

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    # --- forward ---------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``input_ids (batch, seqlen)`` -> logits ``(batch, seqlen, vocab)`` in
        the weights' dtype, differentiable. ``attention_mask (batch, seqlen)``
        (1 token, 0 padding; right or left padding): padding never reaches a
        token's state, so the tokens' logits equal those of the unpadded
        rows (padding rows' logits are unspecified). The mask is read on the
        host (a device sync)."""
        mask = None if attention_mask is None else attention_mask.detach().cpu().numpy()
        packing = lm_config.padding_packing(tuple(input_ids.shape), mask)
        residual = self._embed(input_ids)
        for block in self.layers:
            residual = residual + block.mixer(block.norm(residual.to(self.dtype)), **packing)
        return self._logits(self.norm_f(residual.to(self.dtype)))

    def _embed(self, input_ids):
        residual = F.embedding(input_ids, self.embedding)
        return residual.float() if self.config.residual_in_fp32 else residual

    def _logits(self, hidden):
        return F.linear(hidden, self.embedding if self.lm_head is None else self.lm_head)

    def _serve(self, token_ids, cache, metadata):
        """The serving forward: packed ``token_ids (T,)`` -> final normed hidden ``(T, hidden)``,
        the states of ``cache`` updated at the metadata's slots."""
        residual = self._embed(token_ids)
        hidden = self.layers[0].norm(residual.to(self.dtype))  # the embedding: exact in that dtype
        next_norms = [block.norm for block in self.layers[1:]] + [self.norm_f]
        for i, (block, norm) in enumerate(zip(self.layers, next_norms)):
            hidden, residual = norm.add_and_norm(block.mixer(hidden, cache, metadata, i), residual)
        return hidden

    # --- generation ------------------------------------------------------------

    def new_cache(self, batch_size: int, state_dtype: str = "float32", owner: str = "torch"):
        """A ``bridge.MambaStateCache`` for ``batch_size`` requests of this
        model (``batch_size + 1`` blocks: block 0 is the null block), on the model's device."""
        import bridge

        return bridge.MambaStateCache(self.layers[0].mixer.get_state_shape(), state_dtype, batch_size + 1,
                                      num_layers=self.config.num_layers, owner=owner, device=str(self.device))

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache=None) -> Prefilled:
        """Run the prompts (``input_ids (batch, seqlen)``, ``attention_mask`` as
        in ``forward``; prompts of different lengths) through the chunked scan
        into ``cache`` (default: the model's own for this batch bucket, reused
        by the next prefill of that bucket) at slots ``1 .. batch``. Returns a
        ``Prefilled`` for ``generate(prefilled=...)`` of either framework's model."""
        mask = None if attention_mask is None else attention_mask.detach().cpu().numpy()
        starts, lengths = lm_config.prompt_layout(tuple(input_ids.shape), mask, op=f"{OP}.prefill")
        if (lengths == 0).any():
            fail(f"{OP}.prefill", "attention_mask", f"leaves rows {np.flatnonzero(lengths == 0).tolist()} "
                                                    "without tokens; every prompt needs one")
        batch = len(lengths)
        if cache is None:
            bucket = lm_config.batch_bucket(batch)
            cache = self._caches.get(bucket) or self._caches.setdefault(bucket, self.new_cache(bucket))
        slots = lm_config.allocate_slots(batch)
        lm_config.check_slots_fit(slots, cache.num_blocks, f"{OP}.prefill")
        prefill = self._prefill_layout(cache, tuple(input_ids.shape), starts, lengths, slots)
        return Prefilled(cache=cache, slots=slots, logits=prefill.run(input_ids))

    @torch.no_grad()
    def generate(self, input_ids: Optional[torch.Tensor] = None, max_new_tokens: int = 20,
                 attention_mask: Optional[torch.Tensor] = None, *, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                 eos_token_id: Optional[int] = None, callback: Optional[Callable] = None,
                 prefilled: Optional[Prefilled] = None) -> torch.Tensor:
        """Generate ``max_new_tokens`` tokens after each prompt: returns the new
        tokens ``(batch, max_new_tokens)`` (int64, on the model's device),
        ``eos_token_id`` after a row's end of sequence.

        Greedy (``temperature`` 0, the default), or sampled from
        ``softmax(logits / temperature)`` restricted to the ``top_k`` most
        likely tokens and the smallest set of them whose probability reaches
        ``top_p``, with a ``torch.Generator`` seeded by ``seed`` (same seed,
        same tokens). ``callback(step, tokens (batch,) numpy)`` streams each
        step's tokens (a device sync per step). Continue a prefill of either
        framework with ``prefilled=`` instead of ``input_ids``.

        The decode steps run on the state update, captured in a CUDA graph
        per batch bucket (``lm_config.batch_bucket``) on CUDA, eagerly
        elsewhere; sampling runs eagerly after each step. With an
        ``eos_token_id`` the loop stops once every row ended (checked every
        16 steps: one sync)."""
        params = lm_config.check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                          top_p=top_p, seed=seed, eos_token_id=eos_token_id,
                                          vocab_size=self.config.vocab_size)
        if (input_ids is None) == (prefilled is None):
            fail(f"{OP}.generate", "input_ids", "or `prefilled` must be given (exactly one of them)")
        if prefilled is None:
            prefilled = self.prefill(input_ids, attention_mask)
        return self._decode(prefilled, params, callback)

    def _decode(self, prefilled: Prefilled, params: SamplingParams, callback) -> torch.Tensor:
        import bridge

        if not isinstance(prefilled.cache, bridge.MambaStateCache):
            fail(f"{OP}.generate", "prefilled", "must hold a bridge.MambaStateCache to continue in torch "
                                                "(prefill the Flax model with cache=...)")
        prefilled.consume(f"{OP}.generate")
        batch, n = len(prefilled.slots), params.max_new_tokens
        out = torch.full((batch, n), params.eos_token_id or 0, dtype=torch.long, device=self.device)
        if n == 0:
            return out
        logits = prefilled.logits
        if not isinstance(logits, torch.Tensor):
            logits = bridge.to_torch(logits, copy_ok=True, name="prefilled.logits")
        generator = None if params.greedy else torch.Generator(self.device).manual_seed(params.seed)
        step = self._decode_step(prefilled.cache, lm_config.batch_bucket(batch))
        step.bind(prefilled.slots)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        for i in range(n):
            token = _sample(logits.to(self.device), params, generator)
            if params.eos_token_id is not None:
                token = torch.where(done, params.eos_token_id, token)
                done |= token == params.eos_token_id
            out[:, i] = token
            if callback is not None:
                callback(i, token.cpu().numpy())
            if i + 1 == n or (params.eos_token_id is not None and i % 16 == 15 and bool(done.all())):
                break
            logits = step.run(token)
        return out

    def _prefill_layout(self, cache, shape: tuple, starts: np.ndarray, lengths: np.ndarray,
                        slots: np.ndarray) -> "LMPrefill":
        """The prefill of the prompts at ``starts`` with ``lengths`` in input
        ids of ``shape``, into ``slots`` of ``cache``:
        eager the first time a layout is seen, captured in a CUDA graph the
        second time (on CUDA, without tensor parallelism, while
        ``prefill_graphs > 0``) and replayed after that; the last
        ``prefill_graphs`` layouts kept."""
        capturable = self.device.type == "cuda" and self.layers[0].mixer.process_group is None
        if not (self.prefill_graphs > 0 and capturable):
            return LMPrefill(self, cache, shape, starts, lengths, slots, capture=False)
        key = (shape, tuple(starts.tolist()), tuple(lengths.tolist()), tuple(slots.tolist()), id(cache),
               self.embedding.data_ptr(), self.dtype)
        prefill = self._prefills.pop(key, None)
        if prefill is None or prefill.graph is None:
            prefill = LMPrefill(self, cache, shape, starts, lengths, slots, capture=prefill is not None)
        self._prefills[key] = prefill
        while len(self._prefills) > self.prefill_graphs:
            self._prefills.popitem(last=False)
        return prefill

    def _decode_step(self, cache, bucket: int) -> "CapturedLMStep":
        """The decode step for ``bucket`` requests on ``cache`` (captured once per
        bucket, cache and weights' storage; the last ``MAX_CAPTURED_STEPS`` kept)."""
        key = (bucket, id(cache), self.embedding.data_ptr(), self.dtype)
        if key in self._steps:
            self._steps.move_to_end(key)
        else:
            self._steps[key] = CapturedLMStep(self, cache, bucket)
            while len(self._steps) > MAX_CAPTURED_STEPS:
                self._steps.popitem(last=False)
        return self._steps[key]


def _sample(logits: torch.Tensor, params: SamplingParams, generator) -> torch.Tensor:
    """``logits (batch, vocab)`` -> tokens ``(batch,)`` int64 (see ``generate``)."""
    logits = logits.float()
    if params.greedy:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p is not None and params.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # the tokens past the first reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


class LMPrefill:
    """The prefill of one prompt layout (input ids of ``shape``, the prompts
    at ``starts`` with ``lengths``, into ``slots`` of ``cache``) on static
    metadata: eager, or with ``capture`` (CUDA) captured in a CUDA graph with
    the gather of the prompts' tokens, so that a repeated layout costs no
    host time per layer. ``run(input_ids)`` -> logits ``(batch, vocab)`` of
    each prompt's last token (a new tensor: a later replay does not overwrite it)."""

    def __init__(self, model: Mamba2LMHeadModel, cache, shape: tuple, starts: np.ndarray,
                 lengths: np.ndarray, slots: np.ndarray, capture: bool):
        self.model, self.cache = model, cache
        device = model.device
        rows = np.repeat(np.arange(len(lengths)), lengths)
        columns = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)])
        self.tokens_at = (torch.from_numpy(rows).to(device), torch.from_numpy(columns).to(device))
        metadata = lm_config.prefill_metadata(lengths, slots, model.config.chunk_size)
        self.metadata = metadata_to_device(metadata, device)
        self.last = torch.from_numpy(np.cumsum(lengths) - 1).to(device)
        self.input_ids, self.graph = None, None
        if capture:  # the layout ran eagerly once already: its kernels are compiled
            self.input_ids = torch.zeros(shape, dtype=torch.long, device=device)
            self.graph = torch.cuda.CUDAGraph()
            with platform.cuda_graph(self.graph):
                self.logits = self._prefill(self.input_ids)

    def _prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            tokens = input_ids[self.tokens_at]
            return self.model._logits(self.model._serve(tokens, self.cache, self.metadata)[self.last])

    def run(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self._prefill(input_ids.to(self.model.device))
        self.input_ids.copy_(input_ids)
        self.cache.claim_for_torch()  # orders torch after JAX steps on the cache
        self.graph.replay()
        return self.logits.clone()


class CapturedLMStep:
    """One decode step of the whole model (embedding, every layer's norm and
    mixer on ``cache``, final norm, head) for ``bucket`` requests, on static
    buffers: captured in a CUDA graph on CUDA (the mixers' ``CapturedDecodeStep``
    for a whole model), run eagerly elsewhere. ``bind(slots)`` sets the
    requests' slots (the rest of the bucket are padding requests on the null
    block) and orders torch after JAX steps on the cache; ``run(tokens (batch,))`` -> logits ``(batch, vocab)`` (a view of
    the static output, overwritten by the next step)."""

    def __init__(self, model: Mamba2LMHeadModel, cache, bucket: int):
        self.model, self.cache, self.bucket = model, cache, bucket
        device = model.device
        self.tokens = torch.zeros(bucket, dtype=torch.long, device=device)
        # Padding requests only until bound: the warm-up and capture write no slot.
        self.metadata = metadata_to_device(lm_config.decode_metadata(np.zeros(0, np.int32), bucket,
                                                                     model.config.chunk_size), device)
        self.graph = None
        if device.type != "cuda":
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compiles the kernels, outside the capture
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with platform.cuda_graph(self.graph):
            self.logits = self._step()

    def _step(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model._logits(self.model._serve(self.tokens, self.cache, self.metadata))

    def bind(self, slots: np.ndarray) -> None:
        padded = lm_config.decode_metadata(slots, self.bucket, self.model.config.chunk_size)
        self.metadata.state_indices_tensor_d.copy_(torch.from_numpy(padded.state_indices_tensor_d))
        self.batch = len(slots)
        self.cache.claim_for_torch()  # orders torch after JAX steps on the cache

    def run(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens[:self.batch].copy_(tokens)
        if self.graph is None:
            return self._step()[:self.batch]
        self.graph.replay()
        return self.logits[:self.batch]
