"""Tensor-parallel sharding of the mixer (bridge.spec.mixer_sharding): shard a
random checkpoint, run every rank's math in float64 (the norm's all-reduce
and the row-parallel out_proj's partial sums done by hand), and compare with
the unsharded mixer; the weight loader's rules; bad configs."""

import numpy as np
import pytest

from bridge.spec.mixer_sharding import MixerDims, mamba_v2_sharded_weight_loader, shard_mixer_weights
from mixer_reference import gated_norm_ref, mixer_ref, random_weights, ssm_ref

EPS = 1e-5


@pytest.mark.parametrize("n_groups,tp_size", [(4, 2), (2, 2), (1, 4), (1, 1)])
def test_sharded_ranks_recombine_to_the_unsharded_mixer(n_groups, tp_size, rng):
    hidden, heads, head_dim, state, width = 12, 8, 4, 6, 4
    full = MixerDims(heads * head_dim, n_groups, heads, head_dim, state)
    weights = random_weights(rng, full, hidden, width, use_bias=True)
    tokens = rng.standard_normal((9, hidden))
    cu = np.array([0, 2, 9])
    conv_init = [None, rng.standard_normal((width - 1, full.conv_dim))]
    want, want_conv, want_ssm = mixer_ref(weights, full, tokens, cu, EPS, conv_init)

    dims = MixerDims(heads * head_dim, n_groups, heads, head_dim, state, tp_size)
    shards = [shard_mixer_weights(weights, dims, rank) for rank in range(tp_size)]
    # Each rank's conv history: its x channels, then its B and C groups (a
    # replicated group: the one group).
    I, GN = full.intermediate_size, n_groups * state
    channels = dims.local("intermediate_size")
    ys, gates = [], []
    for rank, shard in enumerate(shards):
        x_rows = np.arange(rank * channels, (rank + 1) * channels)
        g_local = dims.local("padded_groups") * state
        g_rows = np.arange(g_local) if n_groups == 1 else np.arange(rank * g_local, (rank + 1) * g_local)
        rank_init = [None, conv_init[1][:, np.concatenate([x_rows, I + g_rows, I + GN + g_rows])]]
        y, gate, conv_final, ssm_final = ssm_ref(shard, dims, tokens, cu, rank_init)
        heads = slice(rank * dims.local("num_heads"), (rank + 1) * dims.local("num_heads"))
        np.testing.assert_allclose(ssm_final, want_ssm[:, heads])
        np.testing.assert_allclose(conv_final[:, :, :channels], want_conv[:, :, x_rows])
        ys.append(y)
        gates.append(gate)
    if dims.norm_is_local:
        normed = [gated_norm_ref(y, g, s["norm.weight"], dims.norm_group_size, EPS)
                  for y, g, s in zip(ys, gates, shards)]
    else:  # n_groups == 1: the sums of squares all-reduced, i.e. the norm over all ranks
        whole = gated_norm_ref(np.concatenate(ys, 1), np.concatenate(gates, 1),
                               weights["norm.weight"], dims.norm_group_size, EPS)
        normed = np.split(whole, tp_size, axis=1)
    # Row-parallel out_proj: partial sums reduced, the replicated bias added once.
    assert all(np.array_equal(s["out_proj.bias"], weights["out_proj.bias"]) for s in shards)
    partial = [v @ s["out_proj.weight"].T for v, s in zip(normed, shards)]
    np.testing.assert_allclose(sum(partial) + weights["out_proj.bias"], want, rtol=1e-10, atol=1e-10)


def test_loader_replicates_a_single_group():
    """n_groups = 1, tp = 2: both ranks get group 0 next to their own heads."""
    spec = MixerDims(8, 1, 4, 2, 3, tp_size=2).conv_shard_spec()
    loaded = np.arange(8 + 3 + 3, dtype=float)[:, None]  # x: 0..7, B: 8..10, C: 11..13
    for rank in range(2):
        param = np.full((4 + 3 + 3, 1), np.nan)
        mamba_v2_sharded_weight_loader(spec, 2, rank)(param, loaded)
        own_x = list(range(4 * rank, 4 * rank + 4))
        np.testing.assert_array_equal(param[:, 0], own_x + [8, 9, 10, 11, 12, 13])


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="`num_heads`"):
        MixerDims(24, 1, 6, 4, 8, tp_size=4)
    with pytest.raises(ValueError, match="`intermediate_size`"):
        MixerDims(30, 1, 6, 4, 8)
    with pytest.raises(ValueError, match="`n_groups`"):
        MixerDims(32, 2, 8, 4, 8, tp_size=4)
    with pytest.raises(ValueError, match="`loaded_weight`"):
        mamba_v2_sharded_weight_loader([(8, 0, False)], 2, 0)(np.zeros((4, 1)), np.zeros((7, 1)))
