"""Train a tiny Mamba-2 language model in each framework on the mixers'
cache-free training forward: embedding -> ``layers`` x (mixer + residual) ->
linear head, AdamW, on a synthetic task (the next token is the one
``LAG`` tokens back, so the model must carry a state). Both frameworks start
from the same weights on the same batches; the losses are printed side by
side and must fall.

    python -m experiments.train_tiny [--steps 10] [--framework both|torch|jax] [--gpu]

On a CPU (the interpreters: about 30 s a torch step and 10 s a JAX step on
2 cores) use few steps; ``--gpu`` uses a larger model (hidden 256, 4
layers, 8 x 512 tokens) on CUDA.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

LAG = 3
TINY = dict(vocab=16, hidden=32, layers=2, batch=2, seqlen=24,
            mixer=dict(ssm_state_size=16, conv_kernel_size=4, intermediate_size=64, use_conv_bias=True,
                       use_bias=False, n_groups=1, num_heads=4, head_dim=16, chunk_size=16))
GPU = dict(vocab=64, hidden=256, layers=4, batch=8, seqlen=512,
           mixer=dict(ssm_state_size=64, conv_kernel_size=4, intermediate_size=512, use_conv_bias=True,
                      use_bias=False, n_groups=1, num_heads=8, head_dim=64, chunk_size=128))
LR, WEIGHT_DECAY = 3e-3, 0.01


def batches(config, steps, seed=0):
    """(tokens, targets) int32 numpy batches: targets[t] = tokens[t - LAG] (0 before)."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        tokens = rng.integers(0, config["vocab"], (config["batch"], config["seqlen"]), dtype=np.int32)
        targets = np.zeros_like(tokens)
        targets[:, LAG:] = tokens[:, :-LAG]
        yield tokens, targets


def initial_weights(config, seed=0):
    """The shared initial weights: the torch mixers' own init, embedding and head."""
    import torch
    import torch_impl
    torch.manual_seed(seed)
    mixers = [torch_impl.MambaMixer2(config["hidden"], **config["mixer"]) for _ in range(config["layers"])]
    rng = np.random.default_rng(seed)
    return dict(mixers=[{k: v.numpy().copy() for k, v in m.checkpoint_weights().items()} for m in mixers],
                embed=rng.standard_normal((config["vocab"], config["hidden"])).astype(np.float32),
                head=(rng.standard_normal((config["vocab"], config["hidden"]))
                      / np.sqrt(config["hidden"])).astype(np.float32))


def train_torch(config, weights, steps, device):
    import torch
    import torch.nn.functional as F
    import torch_impl

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(config["vocab"], config["hidden"])
            self.mixers = torch.nn.ModuleList(torch_impl.MambaMixer2(config["hidden"], **config["mixer"])
                                              for _ in range(config["layers"]))
            self.head = torch.nn.Linear(config["hidden"], config["vocab"], bias=False)

        def forward(self, tokens):
            h = self.embed(tokens)
            for mixer in self.mixers:
                h = h + mixer(h)  # the cache-free training forward
            return self.head(h)

    model = Model()
    with torch.no_grad():
        model.embed.weight.copy_(torch.from_numpy(weights["embed"]))
        model.head.weight.copy_(torch.from_numpy(weights["head"]))
    for mixer, w in zip(model.mixers, weights["mixers"]):
        mixer.load_weights(w)
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    losses = []
    for tokens, targets in batches(config, steps):
        tokens, targets = (torch.from_numpy(a).long().to(device) for a in (tokens, targets))
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def train_jax(config, weights, steps):
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import jax_impl

    class Model(nnx.Module):
        def __init__(self):
            self.embed = nnx.Param(jnp.asarray(weights["embed"]))
            self.mixers = nnx.List([jax_impl.MambaMixer2(config["hidden"], **config["mixer"])
                                    for _ in range(config["layers"])])
            self.head = nnx.Param(jnp.asarray(weights["head"]))

        def __call__(self, tokens):
            h = self.embed[...][tokens]
            for mixer in self.mixers:
                h = h + mixer(h)  # the cache-free training forward
            return h @ self.head[...].T

    model = Model()
    for mixer, w in zip(model.mixers, weights["mixers"]):
        mixer.load_weights(w)
    optimizer = nnx.Optimizer(model, optax.adamw(LR, weight_decay=WEIGHT_DECAY), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens, targets):
        def loss_fn(model):
            logits = model(tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer, jnp.asarray(t), jnp.asarray(y))) for t, y in batches(config, steps)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--framework", choices=["both", "torch", "jax"], default="both")
    parser.add_argument("--gpu", action="store_true", help="the larger configuration, on CUDA")
    args = parser.parse_args(argv)
    config = GPU if args.gpu else TINY
    weights = initial_weights(config)
    results = {}
    for name in (["torch", "jax"] if args.framework == "both" else [args.framework]):
        start = time.perf_counter()
        results[name] = (train_torch(config, weights, args.steps, "cuda" if args.gpu else "cpu")
                         if name == "torch" else train_jax(config, weights, args.steps))
        print(f"{name}: {args.steps} steps in {time.perf_counter() - start:.1f} s")
    print("step  " + "  ".join(f"{name:>10}" for name in results))
    for i in range(args.steps):
        print(f"{i:4d}  " + "  ".join(f"{losses[i]:10.5f}" for losses in results.values()))
    for name, losses in results.items():
        first, last = np.mean(losses[:3]), np.mean(losses[-3:])
        if not last < first:
            raise SystemExit(f"{name}: the loss did not fall ({first:.4f} -> {last:.4f})")
    return results


if __name__ == "__main__":
    main()
