"""The framework-neutral half of both ``Mamba2LMHeadModel`` classes
(``torch_impl.mamba2_lm``, ``jax_impl.mamba2_lm``): the configuration parsed
from either published ``config.json`` layout, the checkpoint key maps and
their checks, the prompt / padding layout, and the generation bookkeeping
(slots, metadata, sampling parameters). numpy only.

Layouts:

- ``"mamba_ssm"`` (state-spaces/mamba2-*): ``d_model``, ``n_layer``,
  ``vocab_size`` (padded up to ``pad_vocab_size_multiple``), ``ssm_cfg``
  {``layer: "Mamba2"``, ``d_state``, ``d_conv``, ``expand``, ``headdim``,
  ``ngroups``, ``chunk_size``, ``bias``, ``conv_bias``, ...}, ``rms_norm``,
  ``residual_in_fp32``, ``tie_embeddings``; weights ``backbone.embedding.weight``,
  ``backbone.layers.{i}.norm.weight``, ``backbone.layers.{i}.mixer.*``,
  ``backbone.norm_f.weight``, ``lm_head.weight``.
- ``"transformers"`` (Hugging Face ``Mamba2ForCausalLM``): ``hidden_size``,
  ``num_hidden_layers``, ``state_size``, ``expand``, ``num_heads``,
  ``head_dim``, ``n_groups``, ``conv_kernel``, ``chunk_size``,
  ``use_bias``, ``use_conv_bias``, ``layer_norm_epsilon``,
  ``residual_in_fp32``, ``tie_word_embeddings``; the same weight names but
  ``backbone.embeddings.weight``.

Weights are read from ``model.safetensors`` (or the shards of
``model.safetensors.index.json``) or ``pytorch_model.bin`` (torch only).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Callable, Mapping, Optional

import numpy as np

from bridge.spec.checks import as_int, fail, shape_of
from bridge.spec.mixer_metadata import Mamba2Metadata, build_mamba2_metadata, checkpoint_shapes
from bridge.spec.mixer_sharding import MixerDims
from bridge.spec.ssu_contract import NULL_BLOCK_ID

OP = "Mamba2LMHeadModel"
LAYOUTS = ("mamba_ssm", "transformers")
CONFIG_FILE = "config.json"
SAFETENSORS_FILE, SAFETENSORS_INDEX, BIN_FILE = "model.safetensors", "model.safetensors.index.json", \
    "pytorch_model.bin"
# The one key the layouts name differently (canonical: mamba_ssm's).
EMBEDDING = {"mamba_ssm": "backbone.embedding.weight", "transformers": "backbone.embeddings.weight"}


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """A Mamba-2 language model: ``num_layers`` x (RMSNorm -> ``MambaMixer2``
    -> residual add) between an embedding ``(vocab_size, hidden_size)`` and a
    final RMSNorm + LM head (the embedding when ``tie_embeddings``).
    ``vocab_size`` is the padded size (the embedding's rows)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    state_size: int = 128
    conv_kernel: int = 4
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 256
    use_bias: bool = False
    use_conv_bias: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "state_size", "conv_kernel", "expand",
                     "head_dim", "n_groups", "chunk_size"):
            as_int(OP, f"config.{name}", getattr(self, name), minimum=1)
        if self.intermediate_size % self.head_dim:
            fail(OP, "config.head_dim", f"{self.head_dim} must divide expand * hidden_size = "
                                        f"{self.intermediate_size}")
        MixerDims(self.intermediate_size, self.n_groups, self.num_heads, self.head_dim,
                  self.state_size)  # checks the heads and groups

    @property
    def intermediate_size(self) -> int:
        return self.expand * self.hidden_size

    @property
    def num_heads(self) -> int:
        return self.intermediate_size // self.head_dim

    @property
    def dims(self) -> MixerDims:
        return MixerDims(self.intermediate_size, self.n_groups, self.num_heads, self.head_dim,
                         self.state_size)

    def mixer_args(self) -> dict:
        """``MambaMixer2``'s constructor arguments for every layer."""
        return dict(hidden_size=self.hidden_size, ssm_state_size=self.state_size,
                    conv_kernel_size=self.conv_kernel, intermediate_size=self.intermediate_size,
                    use_conv_bias=self.use_conv_bias, use_bias=self.use_bias, n_groups=self.n_groups,
                    num_heads=self.num_heads, head_dim=self.head_dim, rms_norm_eps=self.norm_eps,
                    chunk_size=self.chunk_size)

    # --- config.json -----------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: Mapping) -> "Mamba2Config":
        """Parse a ``config.json`` of either layout (see the module docstring);
        ValueError for an unknown layout or a feature these models lack."""
        layout = detect_layout(raw)
        if layout == "mamba_ssm":
            ssm = dict(raw.get("ssm_cfg") or {})
            if ssm.get("layer", "Mamba1") != "Mamba2":
                fail(OP, "config.ssm_cfg.layer", f"is {ssm.get('layer', 'Mamba1 (the default)')!r}; "
                                                 "this is a Mamba-2 model")
            _refuse(raw, "attn_layer_idx", [], "attention layers (hybrid models)")
            _refuse(raw, "d_intermediate", 0, "MLP layers")
            _refuse(raw, "rms_norm", True, "LayerNorm (rms_norm false)")
            for key, default, what in (("rmsnorm", True, "a mixer without its gated norm"),
                                       ("norm_before_gate", False, "norm_before_gate"),
                                       ("D_has_hdim", False, "D per channel"), ("d_ssm", None, "d_ssm"),
                                       ("dt_limit", (0.0, math.inf), "dt_limit")):
                _refuse(ssm, key, default, what, prefix="ssm_cfg.")
            vocab, multiple = int(raw["vocab_size"]), int(raw.get("pad_vocab_size_multiple", 1))
            return cls(vocab_size=-(-vocab // multiple) * multiple, hidden_size=raw["d_model"],
                       num_layers=raw["n_layer"], state_size=ssm.get("d_state", 128),
                       conv_kernel=ssm.get("d_conv", 4), expand=ssm.get("expand", 2),
                       head_dim=ssm.get("headdim", 64), n_groups=ssm.get("ngroups", 1),
                       chunk_size=ssm.get("chunk_size", 256), use_bias=bool(ssm.get("bias", False)),
                       use_conv_bias=bool(ssm.get("conv_bias", True)),
                       norm_eps=float(raw.get("norm_epsilon", 1e-5)),
                       residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
                       tie_embeddings=bool(raw.get("tie_embeddings", True)))
        _refuse(raw, "rms_norm", True, "a mixer without its gated norm (rms_norm false)")
        _refuse(raw, "norm_before_gate", False, "norm_before_gate")
        _refuse(raw, "hidden_act", "silu", "an activation other than silu")
        limit = tuple(raw.get("time_step_limit", (0.0, math.inf)))
        if limit != (0.0, math.inf):
            fail(OP, "config.time_step_limit", f"is {limit}; only (0.0, inf) is supported")
        expand, hidden = raw.get("expand", 2), raw["hidden_size"]
        config = cls(vocab_size=raw["vocab_size"], hidden_size=hidden, num_layers=raw["num_hidden_layers"],
                     state_size=raw.get("state_size", 128), conv_kernel=raw.get("conv_kernel", 4),
                     expand=expand, head_dim=raw.get("head_dim", 64), n_groups=raw.get("n_groups", 1),
                     chunk_size=raw.get("chunk_size", 256), use_bias=bool(raw.get("use_bias", False)),
                     use_conv_bias=bool(raw.get("use_conv_bias", True)),
                     norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
                     residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
                     tie_embeddings=bool(raw.get("tie_word_embeddings", False)))
        if "num_heads" in raw and raw["num_heads"] != config.num_heads:
            fail(OP, "config.num_heads", f"is {raw['num_heads']}, but expand * hidden_size / head_dim "
                                         f"= {config.num_heads}")
        return config

    @classmethod
    def from_pretrained(cls, path: str) -> "Mamba2Config":
        """The config of the checkpoint directory ``path`` (its ``config.json``)."""
        return cls.from_dict(read_config(path))

    def to_dict(self, layout: str = "mamba_ssm") -> dict:
        """A ``config.json`` of this model in ``layout`` (vocabulary unpadded:
        ``pad_vocab_size_multiple`` 1)."""
        if layout == "mamba_ssm":
            return dict(d_model=self.hidden_size, d_intermediate=0, n_layer=self.num_layers,
                        vocab_size=self.vocab_size, rms_norm=True, residual_in_fp32=self.residual_in_fp32,
                        fused_add_norm=True, pad_vocab_size_multiple=1, tie_embeddings=self.tie_embeddings,
                        norm_epsilon=self.norm_eps,
                        ssm_cfg=dict(layer="Mamba2", d_state=self.state_size, d_conv=self.conv_kernel,
                                     expand=self.expand, headdim=self.head_dim, ngroups=self.n_groups,
                                     chunk_size=self.chunk_size, bias=self.use_bias,
                                     conv_bias=self.use_conv_bias))
        if layout == "transformers":
            return dict(model_type="mamba2", architectures=["Mamba2ForCausalLM"], vocab_size=self.vocab_size,
                        hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                        state_size=self.state_size, expand=self.expand, num_heads=self.num_heads,
                        head_dim=self.head_dim, n_groups=self.n_groups, conv_kernel=self.conv_kernel,
                        chunk_size=self.chunk_size, use_bias=self.use_bias, use_conv_bias=self.use_conv_bias,
                        layer_norm_epsilon=self.norm_eps, residual_in_fp32=self.residual_in_fp32,
                        tie_word_embeddings=self.tie_embeddings, rms_norm=True, hidden_act="silu")
        fail(OP, "layout", f"must be one of {LAYOUTS}, got {layout!r}")

    # --- weights ---------------------------------------------------------------

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor by canonical (mamba_ssm) name; ``lm_head.weight`` only when untied."""
        shapes = {EMBEDDING["mamba_ssm"]: (self.vocab_size, self.hidden_size),
                  "backbone.norm_f.weight": (self.hidden_size,)}
        mixer = checkpoint_shapes(self.dims, self.hidden_size, self.conv_kernel, use_bias=self.use_bias,
                                  use_conv_bias=self.use_conv_bias, use_rms_norm=True)
        for i in range(self.num_layers):
            shapes[f"backbone.layers.{i}.norm.weight"] = (self.hidden_size,)
            shapes.update({f"{mixer_prefix(i)}{key}": shape for key, shape in mixer.items()})
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return shapes


def mixer_prefix(layer: int) -> str:
    """The checkpoint prefix of layer ``layer``'s mixer weights (both layouts)."""
    return f"backbone.layers.{layer}.mixer."


def _refuse(raw: Mapping, key: str, default, what: str, prefix: str = "") -> None:
    value = raw.get(key, default)
    if isinstance(default, tuple):
        value = tuple(value)
    if value != default:
        fail(OP, f"config.{prefix}{key}", f"is {value!r}: {what} is not supported (expected {default!r})")


def detect_layout(raw: Mapping) -> str:
    """``"mamba_ssm"`` or ``"transformers"`` from a ``config.json``'s keys."""
    if not isinstance(raw, Mapping):
        fail(OP, "config", f"must be a mapping (a parsed config.json), got {type(raw).__name__}")
    if "d_model" in raw and "n_layer" in raw:
        return "mamba_ssm"
    if raw.get("model_type", "mamba2") == "mamba2" and {"hidden_size", "num_hidden_layers"} <= raw.keys():
        return "transformers"
    fail(OP, "config", f"is in an unknown layout (model_type {raw.get('model_type')!r}, keys "
                       f"{sorted(raw)[:12]}): expected mamba_ssm's (d_model, n_layer, ssm_cfg, ...) or "
                       "Hugging Face Mamba2's (model_type 'mamba2', hidden_size, num_hidden_layers, ...)")


def read_config(path: str) -> dict:
    """The parsed ``config.json`` of the checkpoint directory ``path``."""
    file = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.isfile(file):
        fail(OP, "path", f"{os.fspath(path)!r} has no {CONFIG_FILE}")
    with open(file) as f:
        return json.load(f)


def read_weights(path: str, load_safetensors: Callable[[str], Mapping],
                 load_bin: Callable[[str], Mapping]) -> dict:
    """The raw tensors of the checkpoint directory ``path`` by file key:
    ``model.safetensors``, its shards (``model.safetensors.index.json``), or
    ``pytorch_model.bin``, through the framework's loaders."""
    path = os.fspath(path)
    file = lambda name: os.path.join(path, name)  # noqa: E731
    if os.path.isfile(file(SAFETENSORS_FILE)):
        return dict(load_safetensors(file(SAFETENSORS_FILE)))
    if os.path.isfile(file(SAFETENSORS_INDEX)):
        with open(file(SAFETENSORS_INDEX)) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        weights = {}
        for shard in shards:
            weights.update(load_safetensors(file(shard)))
        return weights
    if os.path.isfile(file(BIN_FILE)):
        return dict(load_bin(file(BIN_FILE)))
    fail(OP, "path", f"{path!r} holds no weights: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or "
                     f"{BIN_FILE}")


def canonical_weights(raw: Mapping, config: Mamba2Config, layout: str) -> dict:
    """The tensors of a ``layout`` checkpoint under canonical (mamba_ssm)
    names, checked against ``config``: ValueError naming the first missing,
    mis-shaped or unexpected key (by its name in the file). A tied model's
    ``lm_head.weight``, when saved, must have the embedding's shape and is
    dropped (the head is the embedding)."""
    to_file = {EMBEDDING["mamba_ssm"]: EMBEDDING[layout]}
    expected = {to_file.get(key, key): shape for key, shape in config.checkpoint_shapes().items()}
    if config.tie_embeddings and "lm_head.weight" in raw:
        expected["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    for key, shape in expected.items():
        got = shape_of(raw.get(key))
        allowed = (shape, (shape[0], shape[2])) if key.endswith("conv1d.weight") else (shape,)
        if got is None:
            fail(OP, "path", f"checkpoint ({layout} layout) lacks `{key}` {shape}")
        if tuple(got) not in allowed:
            fail(OP, "path", f"checkpoint key `{key}` has shape {tuple(got)}, expected {shape}")
    extra = sorted(k for k in raw if k not in expected)
    if extra:
        fail(OP, "path", f"checkpoint ({layout} layout) has unexpected keys {extra[:8]}")
    weights = {(EMBEDDING["mamba_ssm"] if key == EMBEDDING[layout] else key): value for key, value in raw.items()}
    if config.tie_embeddings:
        weights.pop("lm_head.weight", None)
    return weights


def mixer_weights(weights: Mapping, layer: int) -> dict:
    """Layer ``layer``'s mixer tensors by the mixers' checkpoint names."""
    prefix = mixer_prefix(layer)
    return {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}


def load_pretrained(path, load_safetensors: Callable[[str], Mapping],
                    load_bin: Callable[[str], Mapping]) -> tuple[Mamba2Config, dict]:
    """``from_pretrained``'s reading: the config of ``path`` and its weights
    under canonical names, checked (the framework's loaders read the files)."""
    raw = read_config(path)
    config = Mamba2Config.from_dict(raw)
    return config, canonical_weights(read_weights(path, load_safetensors, load_bin), config, detect_layout(raw))


class LMLayout:
    """Base of both ``Mamba2LMHeadModel`` classes: checkpoint I/O under
    canonical names over their common attributes (``config``, ``embedding``,
    ``layers[i].norm.weight``, ``layers[i].mixer``, ``norm_f.weight``,
    ``lm_head``); the framework's half: ``_assign(param, value)`` and
    ``_read(param)``."""

    def load_weights(self, weights: Mapping) -> None:
        """Copy in a checkpoint under canonical (mamba_ssm) names (torch, jax
        or numpy arrays; ``lm_head.weight`` only when untied), checked first
        (``canonical_weights``)."""
        weights = canonical_weights(weights, self.config, "mamba_ssm")
        for key, param in self._params_by_key().items():
            self._assign(param, weights[key])
        for i, block in enumerate(self.layers):
            block.mixer.load_weights(mixer_weights(weights, i))

    def checkpoint_weights(self) -> dict:
        """The weights under canonical (mamba_ssm) checkpoint names."""
        weights = {key: self._read(param) for key, param in self._params_by_key().items()}
        for i, block in enumerate(self.layers):
            weights.update({mixer_prefix(i) + k: v for k, v in block.mixer.checkpoint_weights().items()})
        return weights

    def _params_by_key(self) -> dict:
        params = {EMBEDDING["mamba_ssm"]: self.embedding, "backbone.norm_f.weight": self.norm_f.weight}
        params.update({f"backbone.layers.{i}.norm.weight": b.norm.weight for i, b in enumerate(self.layers)})
        if self.lm_head is not None:
            params["lm_head.weight"] = self.lm_head
        return params


# --- prompts and padding ---------------------------------------------------------

def prompt_layout(input_shape, attention_mask: Optional[np.ndarray], *,
                  op: str = OP) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, lengths)`` int64 per row of ``input_ids (batch, seqlen)``:
    the run of ones of ``attention_mask`` (host values, 0/1 or bool; right or
    left padding), or the whole row without one. A row's ones must be one
    contiguous run."""
    if len(input_shape) != 2:
        fail(op, "input_ids", f"must be 2-D (batch, seqlen), got shape {tuple(input_shape)}")
    batch, seqlen = (int(n) for n in input_shape)
    if attention_mask is None:
        return np.zeros(batch, np.int64), np.full(batch, seqlen, np.int64)
    mask = np.asarray(attention_mask)
    if mask.shape != (batch, seqlen):
        fail(op, "attention_mask", f"has shape {mask.shape}, expected ({batch}, {seqlen}) like `input_ids`")
    if not np.isin(mask, (0, 1)).all():
        fail(op, "attention_mask", "must hold 0 (padding) and 1 (tokens) only")
    mask = mask.astype(bool)
    lengths = mask.sum(1)
    starts = np.where(lengths > 0, mask.argmax(1), 0)
    runs = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    if ((runs == 1).sum(1) > 1).any():
        row = int(np.flatnonzero((runs == 1).sum(1) > 1)[0])
        fail(op, "attention_mask", f"row {row} has tokens after padding and padding after tokens; each "
                                   "row's tokens must be one run (right or left padding)")
    return starts.astype(np.int64), lengths.astype(np.int64)


def padding_packing(input_shape, attention_mask: Optional[np.ndarray]) -> dict:
    """The cache-free forward's packing argument for a padded batch:
    ``seq_idx (batch, seqlen)`` 0 before a row's tokens, 1 on them, 2 after,
    so padding never feeds a token's state; {} when no row is padded."""
    starts, lengths = prompt_layout(input_shape, attention_mask)
    seqlen = int(input_shape[1])
    if (lengths == seqlen).all():
        return {}
    columns = np.arange(seqlen)[None, :]
    return dict(seq_idx=(columns >= starts[:, None]).astype(np.int32)
                + (columns >= (starts + lengths)[:, None]).astype(np.int32))


# --- generation bookkeeping --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Checked sampling options (``check_sampling``); ``temperature`` 0 is greedy."""

    max_new_tokens: int
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    seed: int
    eos_token_id: Optional[int]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_sampling(*, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
                   vocab_size: int, op: str = f"{OP}.generate") -> SamplingParams:
    """ValueError naming the argument for a bad sampling option."""
    max_new_tokens = as_int(op, "max_new_tokens", max_new_tokens, minimum=0)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not 0 <= temperature < math.inf:
        fail(op, "temperature", f"must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None:
        top_k = as_int(op, "top_k", top_k, minimum=1)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0 < top_p <= 1):
        fail(op, "top_p", f"must be a number in (0, 1], got {top_p!r}")
    seed = 0 if seed is None else as_int(op, "seed", seed, minimum=0)
    if eos_token_id is not None:
        eos_token_id = as_int(op, "eos_token_id", eos_token_id, minimum=0)
        if eos_token_id >= vocab_size:
            fail(op, "eos_token_id", f"is {eos_token_id}, outside the vocabulary [0, {vocab_size})")
    return SamplingParams(max_new_tokens, float(temperature), top_k, None if top_p is None else float(top_p),
                          seed, eos_token_id)


def batch_bucket(batch: int) -> int:
    """The decode batch a batch of ``batch`` requests runs at: the next power
    of two (one CUDA graph / compilation per bucket)."""
    return 1 << max(0, int(batch) - 1).bit_length()


def allocate_slots(batch: int) -> np.ndarray:
    """Cache slots ``1 .. batch`` for ``batch`` requests: never the null block
    (``NULL_BLOCK_ID`` = 0); a cache for them needs ``batch + 1`` blocks."""
    assert NULL_BLOCK_ID == 0
    return np.arange(1, batch + 1, dtype=np.int32)


def check_slots_fit(slots: np.ndarray, num_blocks: int, op: str = OP) -> None:
    """The slots of a generation fit a cache of ``num_blocks`` blocks."""
    if int(slots.max(initial=0)) >= num_blocks:
        fail(op, "cache", f"has {num_blocks} blocks; {len(slots)} requests need {int(slots.max()) + 1} "
                          "(slot 0 is the null block)")


def prefill_metadata(lengths: np.ndarray, slots: np.ndarray, chunk_size: int) -> Mamba2Metadata:
    """Every prompt prefilled from a zero state into its slot."""
    return build_mamba2_metadata(lengths.tolist(), [0] * len(lengths), slots, 0, chunk_size)


def decode_metadata(slots: np.ndarray, bucket: int, chunk_size: int) -> Mamba2Metadata:
    """One token per request for ``bucket`` requests: ``slots`` first, then
    padding requests on the null block."""
    padded = np.full(bucket, NULL_BLOCK_ID, np.int32)
    padded[:len(slots)] = slots
    return build_mamba2_metadata([1] * bucket, [1] * bucket, padded, bucket, chunk_size,
                                 padding=padded == NULL_BLOCK_ID)


@dataclasses.dataclass
class Prefilled:
    """What a prefill leaves for the decode, in either framework: ``cache``
    (a ``bridge.MambaStateCache``, or the Flax model's own per-layer states),
    the requests' ``slots (batch,)`` in it, and ``logits (batch, vocab)`` of
    each prompt's last token (the framework's array). A generation consumes
    it (the states advance): ``consume`` refuses a second use."""

    cache: object
    slots: np.ndarray
    logits: object
    consumed: bool = False

    def consume(self, op: str) -> None:
        if self.consumed:
            fail(op, "prefilled", "was already continued once (its states have advanced); prefill again")
        self.consumed = True
