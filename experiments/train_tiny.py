"""Train a tiny Mamba-2 language model (``Mamba2LMHeadModel``, the mixers'
cache-free training forward) in each framework from the same initial
weights on the same batches of a synthetic associative-recall task shipped
here (``recall_batches``): each sequence lists key-value pairs, then asks
for some keys again; the loss is on the answers, so the model must store
the pairs in its state. AdamW (torch) and optax AdamW (Flax NNX); the losses
are printed side by side, plotted, and must fall.

    python -m experiments.train_tiny [--steps 40] [--framework both|torch|jax] [--gpu] [--quick]
                                     [--plot FILE.png]

On a CPU the kernels run in the interpreters (seconds a step): ``--quick``
runs 3 steps of a one-layer model and checks that both frameworks start
from the same loss instead of a fall. ``--gpu`` trains a larger model. The
torch side runs where its kernels do (``torch_impl.platform.default_device``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bridge.spec.lm_config import Mamba2Config

TINY = dict(model=dict(vocab_size=32, hidden_size=32, num_layers=2, state_size=16, conv_kernel=4, expand=2,
                       head_dim=16, n_groups=1, chunk_size=16, tie_embeddings=True),
            batch=4, pairs=6, queries=4)
QUICK = dict(TINY, model=dict(TINY["model"], num_layers=1), batch=2, pairs=4, queries=2)
GPU = dict(model=dict(vocab_size=128, hidden_size=256, num_layers=4, state_size=64, conv_kernel=4, expand=2,
                      head_dim=64, n_groups=1, chunk_size=64, tie_embeddings=True),
           batch=32, pairs=48, queries=16)
LR, WEIGHT_DECAY = 3e-3, 0.01


def recall_batches(setup: dict, steps: int, seed: int = 0):
    """Associative recall: ``(tokens (batch, L - 1), targets (batch, L - 1),
    mask (batch, L - 1))`` int32 / float32 numpy per step, L = 2 (pairs +
    queries). Keys come from the lower half of the vocabulary, values from
    the upper half; a row is ``k1 v1 ... kP vP q1 a1 ... qQ aQ`` with each
    query ``q`` a listed key and ``a`` its value; ``mask`` is 1 where the
    target is an answer."""
    rng = np.random.default_rng(seed)
    half, batch = setup["model"]["vocab_size"] // 2, setup["batch"]
    pairs, queries = setup["pairs"], setup["queries"]
    for _ in range(steps):
        keys = np.argsort(rng.random((batch, half)), axis=1)[:, :pairs]
        values = rng.integers(half, 2 * half, (batch, pairs))
        asked = np.argsort(rng.random((batch, pairs)), axis=1)[:, :queries]
        rows = np.arange(batch)[:, None]
        context = np.stack([keys, values], -1).reshape(batch, -1)
        question = np.stack([keys[rows, asked], values[rows, asked]], -1).reshape(batch, -1)
        sequence = np.concatenate([context, question], 1).astype(np.int32)
        mask = np.zeros(sequence.shape, np.float32)
        mask[:, 2 * pairs + 1::2] = 1  # the answers
        yield sequence[:, :-1], sequence[:, 1:], mask[:, 1:]


def initial_weights(setup: dict, seed: int = 0) -> dict:
    """The shared initial weights (the torch model's own init) as numpy, by checkpoint name."""
    import torch
    import torch_impl

    torch.manual_seed(seed)
    model = torch_impl.Mamba2LMHeadModel(Mamba2Config(**setup["model"]))
    return {k: v.numpy().copy() for k, v in model.checkpoint_weights().items()}


def train_torch(setup: dict, weights: dict, steps: int) -> list[float]:
    import torch
    import torch.nn.functional as F
    import torch_impl

    device = torch_impl.platform.default_device()  # where the kernels run

    model = torch_impl.Mamba2LMHeadModel(Mamba2Config(**setup["model"]), device=device)
    model.load_weights(weights)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    losses = []
    for tokens, targets, mask in recall_batches(setup, steps):
        tokens, targets = (torch.from_numpy(a).long().to(device) for a in (tokens, targets))
        mask = torch.from_numpy(mask).to(device)
        per_token = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), reduction="none")
        loss = (per_token * mask.flatten()).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def train_jax(setup: dict, weights: dict, steps: int) -> list[float]:
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import jax_impl

    model = jax_impl.Mamba2LMHeadModel(Mamba2Config(**setup["model"]))
    model.load_weights(weights)
    optimizer = nnx.Optimizer(model, optax.adamw(LR, weight_decay=WEIGHT_DECAY), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens, targets, mask):
        def loss_fn(model):
            per_token = optax.softmax_cross_entropy_with_integer_labels(model(tokens), targets)
            return (per_token * mask).sum() / mask.sum()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer, *map(jnp.asarray, batch))) for batch in recall_batches(setup, steps)]


def plot_losses(path, results: dict) -> None:
    """The loss curves of the frameworks side by side (one panel each, shared axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), sharey=True, squeeze=False)
    for ax, (name, losses) in zip(axes[0], results.items()):
        ax.plot(range(len(losses)), losses, marker=".")
        ax.set(title=f"{name}", xlabel="step", ylabel="answer cross-entropy")
        ax.grid(True, alpha=0.3)
    figure.suptitle("Tiny Mamba-2 LM on associative recall, same initial weights and batches")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--framework", choices=["both", "torch", "jax"], default="both")
    parser.add_argument("--gpu", action="store_true", help="the larger configuration, on CUDA")
    parser.add_argument("--quick", action="store_true", help="3 steps of a one-layer model (CI)")
    parser.add_argument("--plot", help="write the loss curves to this PNG")
    args = parser.parse_args(argv)
    setup = GPU if args.gpu else QUICK if args.quick else TINY
    steps = args.steps or (3 if args.quick else 200 if args.gpu else 40)
    weights = initial_weights(setup)
    results = {}
    for name in (["torch", "jax"] if args.framework == "both" else [args.framework]):
        start = time.perf_counter()
        results[name] = (train_torch(setup, weights, steps)
                         if name == "torch" else train_jax(setup, weights, steps))
        print(f"{name}: {steps} steps in {time.perf_counter() - start:.1f} s")
    print("step  " + "  ".join(f"{name:>10}" for name in results))
    for i in range(steps):
        print(f"{i:4d}  " + "  ".join(f"{losses[i]:10.5f}" for losses in results.values()))
    if args.plot:
        plot_losses(args.plot, results)
    if not all(np.isfinite(losses).all() for losses in results.values()):
        raise SystemExit(f"a loss is not finite: {results}")
    if len(results) == 2 and not np.isclose(results["torch"][0], results["jax"][0], rtol=1e-4):
        raise SystemExit(f"the frameworks start from different losses: {results['torch'][0]} vs {results['jax'][0]}")
    for name, losses in results.items():
        first, last = np.mean(losses[:3]), np.mean(losses[-3:])
        if not args.quick and not last < first:
            raise SystemExit(f"{name}: the loss did not fall ({first:.4f} -> {last:.4f})")
    return results


if __name__ == "__main__":
    main()
