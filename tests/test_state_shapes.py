"""State shapes (vLLM's MambaStateShapeCalculator) and the conv-state layout
switch; framework-neutral, so no torch or jax here."""

import pytest

from bridge.spec import state_shapes
from bridge.spec.state_shapes import CONV_STATE_LAYOUT_ENV, MambaStateShapeCalculator as Calc

TP_SIZES = [1, 2, 4, 8]


@pytest.fixture(params=["SD", "DS"])
def layout(request, monkeypatch):
    monkeypatch.setenv(CONV_STATE_LAYOUT_ENV, request.param)
    return request.param


def oriented(layout, dim, state_len):
    return (state_len, dim) if layout == "SD" else (dim, state_len)


def test_default_layout_is_sd(monkeypatch):
    monkeypatch.delenv(CONV_STATE_LAYOUT_ENV, raising=False)
    assert state_shapes.get_conv_state_layout() == "SD"
    assert not state_shapes.is_conv_state_dim_first()
    assert Calc.short_conv_state_shape(1, 64, 4) == ((3, 64),)


def test_bad_layout_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(CONV_STATE_LAYOUT_ENV, "sd")
    with pytest.raises(ValueError, match=CONV_STATE_LAYOUT_ENV):
        state_shapes.get_conv_state_layout()


def test_mamba2_known_model(layout):
    # Mamba2-2.7B: intermediate 5120, 1 group, 80 heads of 64, state 128, conv 4.
    assert Calc.mamba2_state_shape(1, 5120, 1, 80, 64, 128, 4) == (
        oriented(layout, 5120 + 2 * 128, 3), (80, 64, 128))
    # TP 8: the single group is replicated to 8 (one per rank): 7168 / 8 = 896.
    assert Calc.mamba2_state_shape(8, 5120, 1, 80, 64, 128, 4, num_spec=2) == (
        oriented(layout, 896, 5), (10, 64, 128))


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("n_groups", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("num_spec", [0, 3])
def test_mamba2_group_padding(layout, tp, n_groups, num_spec):
    heads, head_dim, state, conv = 32, 16, 8, 4
    intermediate = heads * head_dim
    padded = n_groups if n_groups % tp == 0 else tp  # spec: ngroups + (tp - ngroups)
    assert Calc.extra_groups_for_head_shards(n_groups, tp) == padded - n_groups
    conv_dim = intermediate + 2 * padded * state
    if conv_dim % tp:
        with pytest.raises(ValueError, match="conv_dim"):
            Calc.mamba2_state_shape(tp, intermediate, n_groups, heads, head_dim, state, conv, num_spec)
        return
    assert Calc.mamba2_state_shape(tp, intermediate, n_groups, heads, head_dim, state, conv, num_spec) == (
        oriented(layout, conv_dim // tp, conv - 1 + num_spec), (heads // tp, head_dim, state))


def test_extra_groups_when_tp_does_not_divide():
    assert Calc.extra_groups_for_head_shards(1, 4) == 3
    assert Calc.extra_groups_for_head_shards(3, 4) == 1
    assert Calc.extra_groups_for_head_shards(8, 4) == 0
    # 3 groups on TP 2: padded to 3 + (2 - 3) = 2 (the spec's rule, used as is).
    assert Calc.extra_groups_for_head_shards(3, 2) == -1


@pytest.mark.parametrize("tp", TP_SIZES)
def test_mamba1_and_short_conv(layout, tp):
    assert Calc.mamba1_state_shape(tp, 1024, 16, 4) == (oriented(layout, 1024 // tp, 3), (1024 // tp, 16))
    assert Calc.short_conv_state_shape(tp, 2048, 3) == (oriented(layout, 2048 // tp, 2),)


@pytest.mark.parametrize("tp", TP_SIZES)
def test_gated_delta_net(layout, tp):
    k_heads, v_heads, k_dim, v_dim = 16, 32, 128, 64
    conv_dim = 2 * k_heads * k_dim + v_heads * v_dim
    assert Calc.gated_delta_net_state_shape(tp, k_heads, v_heads, k_dim, v_dim, 4, num_spec=2) == (
        oriented(layout, conv_dim // tp, 5), (v_heads // tp, v_dim, k_dim))


@pytest.mark.parametrize("tp", TP_SIZES)
def test_kda(layout, tp):
    conv_q = oriented(layout, 32 * 128 // tp, 3)
    assert Calc.kda_state_shape(tp, 32, 128) == (conv_q, conv_q, conv_q, (32 // tp, 128, 128))
    conv_k = oriented(layout, 8 * 64 // tp, 2)
    # num_spec adds no conv positions for KDA (as in the spec).
    assert Calc.kda_state_shape(tp, 32, 128, num_k_heads=8, head_k_dim=64, conv_kernel_size=3,
                                num_spec=2) == (
        oriented(layout, 32 * 128 // tp, 2), conv_k, conv_k, (32 // tp, 128, 128))


@pytest.mark.parametrize("tp", TP_SIZES)
def test_linear_attention_floors(tp):
    assert Calc.linear_attention_state_shape(num_heads=12, tp_size=tp, head_dim=64) == (
        (12 // tp, 64, 64),)  # 12 // 8 == 1: floor division, no divisibility check


@pytest.mark.parametrize("call,arg", [
    (lambda: Calc.mamba1_state_shape(3, 1024, 16, 4), "intermediate_size"),
    (lambda: Calc.mamba2_state_shape(4, 512, 4, 6, 64, 16, 4), "num_heads"),
    (lambda: Calc.short_conv_state_shape(0, 64, 4), "tp_world_size"),
    (lambda: Calc.gated_delta_net_state_shape(2, 4, 3, 64, 64, 4), "num_v_heads"),
    (lambda: Calc.kda_state_shape(8, 4, 64), "num_heads"),
])
def test_indivisible_sizes_name_the_argument(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()
