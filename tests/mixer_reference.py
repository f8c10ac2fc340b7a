"""A Mamba-2 mixer in float64 numpy, token by token (plain ops, no
kernels): what both frameworks' ``MambaMixer2`` and the tensor-parallel
shards are tested against. Weights by Hugging Face / mamba_ssm key names."""

from __future__ import annotations

import numpy as np

from bridge.spec.mixer_sharding import MixerDims



def _in_projection(weights, hidden_states, I, conv_dim):
    """in_proj split into ``(gate (T, I), xBC (T, conv_dim), dt (T, H))``, and the
    conv weight as ``(conv_dim, W)``."""
    proj = hidden_states @ weights["in_proj.weight"].T
    if "in_proj.bias" in weights:
        proj = proj + weights["in_proj.bias"]
    conv_w = weights["conv1d.weight"].reshape(conv_dim, -1)
    return proj[:, :I], proj[:, I:I + conv_dim], proj[:, I + conv_dim:], conv_w

def silu(v):
    return v / (1.0 + np.exp(-v))


def softplus(v):
    return np.where(v > 20.0, v, np.log1p(np.exp(np.minimum(v, 20.0))))


def random_weights(rng, dims: MixerDims, hidden_size: int, conv_kernel: int, *, use_bias=False,
                   use_conv_bias=True) -> dict[str, np.ndarray]:
    """A random unsharded checkpoint (float64; ``conv1d.weight`` 3-D as saved)."""
    G, N, H, I = dims.n_groups, dims.ssm_state_size, dims.num_heads, dims.intermediate_size
    conv_dim = I + 2 * G * N
    w = {"in_proj.weight": rng.standard_normal((2 * I + 2 * G * N + H, hidden_size)) / np.sqrt(hidden_size),
         "conv1d.weight": rng.standard_normal((conv_dim, 1, conv_kernel)) * 0.5,
         "dt_bias": rng.standard_normal(H) * 0.5, "A_log": rng.standard_normal(H) * 0.5,
         "D": rng.standard_normal(H), "norm.weight": 1.0 + 0.1 * rng.standard_normal(I),
         "out_proj.weight": rng.standard_normal((hidden_size, I)) / np.sqrt(I)}
    if use_conv_bias:
        w["conv1d.bias"] = rng.standard_normal(conv_dim) * 0.1
    if use_bias:
        w["in_proj.bias"] = rng.standard_normal(w["in_proj.weight"].shape[0]) * 0.1
        w["out_proj.bias"] = rng.standard_normal(hidden_size) * 0.1
    return w


def ssm_ref(weights, dims: MixerDims, hidden_states, cu_seqlens, conv_init=None, ssm_init=None,
            every_token=False):
    """The mixer up to the norm, for one rank's weights (``dims.local``
    sizes): returns ``(y (T, I), gate (T, I), conv_final (Q, W-1, conv_dim),
    ssm_final (Q, H, P, N))``, or with ``every_token`` the SSM state after
    every token ``(T, H, P, N)`` in place of ``ssm_final``. ``conv_init`` /
    ``ssm_init`` per sequence (None or entries None: zeros)."""
    H, P, N = dims.local("num_heads"), dims.head_dim, dims.ssm_state_size
    I, G = dims.local("intermediate_size"), dims.local("padded_groups")
    conv_dim = dims.local("conv_dim")
    gate, xBC, dt, conv_w = _in_projection(weights, hidden_states, I, conv_dim)
    width = conv_w.shape[1]
    A = -np.exp(weights["A_log"])
    y = np.zeros((len(hidden_states), I))
    conv_final, ssm_final, token_states = [], [], np.zeros((len(hidden_states), H, P, N))
    for q, (begin, end) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        history = np.zeros((width - 1, conv_dim))
        if conv_init is not None and conv_init[q] is not None:
            history = conv_init[q]
        state = np.zeros((H, P, N))
        if ssm_init is not None and ssm_init[q] is not None:
            state = ssm_init[q].copy()
        window = np.concatenate([history, xBC[begin:end]])
        for t in range(begin, end):
            conv = (window[t - begin:t - begin + width] * conv_w.T).sum(0)
            if "conv1d.bias" in weights:
                conv = conv + weights["conv1d.bias"]
            conv = silu(conv)
            x = conv[:I].reshape(H, P)
            B = np.repeat(conv[I:I + G * N].reshape(G, N), H // G, axis=0)
            C = np.repeat(conv[I + G * N:].reshape(G, N), H // G, axis=0)
            step = softplus(dt[t] + weights["dt_bias"])
            state = (np.exp(A * step)[:, None, None] * state
                     + (step[:, None] * x)[:, :, None] * B[:, None, :])
            y[t] = ((state * C[:, None, :]).sum(-1) + weights["D"][:, None] * x).reshape(-1)
            token_states[t] = state
        conv_final.append(window[-(width - 1):])
        ssm_final.append(state)
    return y, gate, np.stack(conv_final), token_states if every_token else np.stack(ssm_final)


def conv_state_ref(weights, dims: MixerDims, hidden_states, state_len):
    """The conv state after one sequence (from zero state) that keeps
    ``state_len`` inputs (W - 1, or W - 1 + num_spec: speculative decoding
    keeps the drafted inputs too): its last ``state_len`` conv inputs (xBC
    before the conv), zeros before its first token; ``(state_len, conv_dim)``."""
    conv_dim = dims.local("conv_dim")
    xBC = _in_projection(weights, hidden_states, dims.local("intermediate_size"), conv_dim)[1]
    return np.concatenate([np.zeros((state_len, conv_dim)), xBC])[-state_len:]


def gated_norm_ref(y, gate, weight, group_size, eps):
    v = y * silu(gate)
    groups = v.reshape(len(v), -1, group_size)
    v = (groups / np.sqrt((groups ** 2).mean(-1, keepdims=True) + eps)).reshape(v.shape)
    return v * weight if weight is not None else v


def mixer_ref(weights, dims: MixerDims, hidden_states, cu_seqlens, eps, conv_init=None,
              ssm_init=None, every_token=False):
    """The whole mixer (one rank, tp_size 1): ``(out (T, hidden), conv_final,
    ssm_final)`` (``every_token``: as in ``ssm_ref``)."""
    y, gate, conv_final, ssm_final = ssm_ref(weights, dims, hidden_states, cu_seqlens,
                                             conv_init, ssm_init, every_token)
    out = gated_norm_ref(y, gate, weights.get("norm.weight"), dims.norm_group_size, eps)
    out = out @ weights["out_proj.weight"].T
    if "out_proj.bias" in weights:
        out = out + weights["out_proj.bias"]
    return out, conv_final, ssm_final


# --- differentiable (torch autograd / jax.grad) --------------------------------------

def _array_ops(xp):
    """The few ops the differentiable reference needs that torch and jax.numpy spell differently."""
    if xp.__name__ == "torch":
        return dict(cat=lambda a: xp.cat(a, 0), repeat=lambda v, n: xp.repeat_interleave(v, n, dim=0),
                    clip_max=lambda v, hi: xp.clamp(v, max=hi))
    return dict(cat=lambda a: xp.concatenate(a, 0), repeat=lambda v, n: xp.repeat(v, n, axis=0),
                clip_max=lambda v, hi: xp.minimum(v, hi))


def autodiff_mixer_ref(xp, weights, dims: MixerDims, hidden_states, cu_seqlens, eps):
    """The whole mixer (tp_size 1, every sequence from zero state) as
    ``mixer_ref``, written in the ops torch and jax.numpy share (``xp``: the
    module ``torch`` or ``jax.numpy``), so that autograd / ``jax.grad`` of it
    in float64 is the reference gradient: ``weights`` by checkpoint key
    (``A_log``, ``conv1d.weight`` 2-D or 3-D), ``hidden_states (T, hidden)``,
    ``cu_seqlens`` host integers. Returns ``out (T, hidden)``."""
    ops = _array_ops(xp)
    cat, repeat = ops["cat"], ops["repeat"]
    H, P, N = dims.num_heads, dims.head_dim, dims.ssm_state_size
    I, G = dims.intermediate_size, dims.padded_groups
    conv_dim = dims.conv_dim
    sig = lambda v: 1.0 / (1.0 + xp.exp(-v))  # noqa: E731
    gate, xBC, dt, conv_w = _in_projection(weights, hidden_states, I, conv_dim)
    width = conv_w.shape[1]
    A = -xp.exp(weights["A_log"])
    step = dt + weights["dt_bias"]
    step = xp.where(step > 20.0, step, xp.log1p(xp.exp(ops["clip_max"](step, 20.0))))  # softplus
    ys = []
    for begin, end in zip(list(cu_seqlens[:-1]), list(cu_seqlens[1:])):
        begin, end = int(begin), int(end)
        window = cat([xBC[:1] * 0.0] * (width - 1) + [xBC[begin:end]])  # zero history
        conv = sum(window[k:k + end - begin] * conv_w[:, k] for k in range(width))
        if "conv1d.bias" in weights:
            conv = conv + weights["conv1d.bias"]
        conv = conv * sig(conv)
        state = None
        for t in range(end - begin):
            x = conv[t, :I].reshape(H, P)
            B = repeat(conv[t, I:I + G * N].reshape(G, N), H // G)
            C = repeat(conv[t, I + G * N:].reshape(G, N), H // G)
            s = step[begin + t]
            update = (s[:, None] * x)[:, :, None] * B[:, None, :]
            state = update if state is None else xp.exp(A * s)[:, None, None] * state + update
            ys.append(((state * C[:, None, :]).sum(-1) + weights["D"][:, None] * x).reshape(1, I))
    v = cat(ys) * (gate * sig(gate))
    groups = v.reshape(v.shape[0], -1, dims.norm_group_size)
    v = (groups / xp.sqrt((groups ** 2).sum(-1)[..., None] / dims.norm_group_size + eps)).reshape(v.shape)
    if "norm.weight" in weights:
        v = v * weights["norm.weight"]
    out = v @ weights["out_proj.weight"].T
    if "out_proj.bias" in weights:
        out = out + weights["out_proj.bias"]
    return out
