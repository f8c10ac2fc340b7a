"""Named benchmark shapes: the one place the benchmarks and tuning scripts
take their model sizes, token counts and batch sizes from.

``*_HEADS`` are ``(nheads, headdim, dstate, ngroups)`` keyword dicts (the
state update and the chunked scan), ``*_MIXER`` the mixer's constructor
arguments. The ``CPU_*`` shapes are tiny: on a CPU the kernels run in the
Triton / Pallas interpreters.
"""

# Mamba-2 2.7B: d_model 2560, expand 2 (intermediate 5120 = 80 heads of 64),
# state 128, one group, conv 4, chunk 256.
MAMBA2_2P7B_HEADS = dict(nheads=80, headdim=64, dstate=128, ngroups=1)
MAMBA2_2P7B_SSD = dict(MAMBA2_2P7B_HEADS, chunk_size=256)
MAMBA2_2P7B_MIXER = dict(hidden_size=2560, ssm_state_size=128, conv_kernel_size=4, intermediate_size=5120,
                         use_conv_bias=True, use_bias=False, n_groups=1, num_heads=80, head_dim=64,
                         chunk_size=256)

CPU_HEADS = dict(nheads=2, headdim=16, dstate=16, ngroups=1)
CPU_SSD = dict(CPU_HEADS, chunk_size=16)
CPU_MIXER = dict(hidden_size=32, ssm_state_size=16, conv_kernel_size=4, intermediate_size=64,
                 use_conv_bias=True, use_bias=False, n_groups=1, num_heads=4, head_dim=16,
                 chunk_size=16)

# Prefill token counts (4k / 16k / 64k); the per-stage profile and tuning use 16k.
PREFILL_TOKENS = (4096, 16384, 65536)
PROFILE_TOKENS = 16384
# Packed prefills: the number of sequences of random lengths sharing the tokens.
MIXED_SEQUENCES = 64
# Decode batch sizes: the state-update sweep, and the buckets of the mixer step.
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIXER_DECODE_BATCHES = (1, 64, 256)
