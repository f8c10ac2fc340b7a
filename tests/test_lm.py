"""The Mamba-2 language model in each framework: both published config
layouts, checkpoints in both layouts written here (safetensors, and
pytorch_model.bin for torch) against a float64 model written from the math
(on ``mixer_reference``'s float64 mixer), torch vs Flax logits on the same
weights, padding invariance, greedy and seeded sampling, eos, prompts of
different lengths in one batch, one generation across the two frameworks
on one shared cache, Hugging Face's ``Mamba2ForCausalLM`` where installed,
and the refused inputs."""

import json
import math

import numpy as np
import pytest

from bridge.spec import lm_config
from bridge.spec.lm_config import Mamba2Config
from frameworks import JaxSide, TorchSide, assert_close
from mixer_reference import mixer_ref, random_weights

pytestmark = pytest.mark.filterwarnings("ignore::bridge.dlpack.BridgeCopyWarning")

CONFIG = Mamba2Config(vocab_size=40, hidden_size=16, num_layers=2, state_size=16, conv_kernel=4, expand=2,
                      head_dim=8, n_groups=2, chunk_size=16, tie_embeddings=False)
TIED = Mamba2Config(**{**CONFIG.__dict__, "tie_embeddings": True, "num_layers": 1})
# The key names, spelled out (not taken from lm_config).
EMBEDDING_KEY = {"mamba_ssm": "backbone.embedding.weight", "transformers": "backbone.embeddings.weight"}


def random_lm_weights(rng, config: Mamba2Config) -> dict:
    """A random checkpoint under mamba_ssm names (float64)."""
    weights = {"backbone.embedding.weight": rng.standard_normal((config.vocab_size, config.hidden_size)),
               "backbone.norm_f.weight": 1 + 0.1 * rng.standard_normal(config.hidden_size)}
    for i in range(config.num_layers):
        weights[f"backbone.layers.{i}.norm.weight"] = 1 + 0.1 * rng.standard_normal(config.hidden_size)
        mixer = random_weights(rng, config.dims, config.hidden_size, config.conv_kernel,
                               use_bias=config.use_bias, use_conv_bias=config.use_conv_bias)
        weights.update({f"backbone.layers.{i}.mixer.{k}": v for k, v in mixer.items()})
    if not config.tie_embeddings:
        weights["lm_head.weight"] = rng.standard_normal((config.vocab_size, config.hidden_size)) / 4
    return weights


def write_checkpoint(folder, config: Mamba2Config, weights: dict, layout: str, fmt: str = "safetensors"):
    """``config.json`` + weights (float32) in ``layout``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict(layout)))
    renamed = {(EMBEDDING_KEY[layout] if k == "backbone.embedding.weight" else k): v.astype(np.float32)
               for k, v in weights.items()}
    if fmt == "safetensors":
        from safetensors.numpy import save_file
        save_file(renamed, str(folder / "model.safetensors"))
    else:
        import torch
        torch.save({k: torch.from_numpy(v) for k, v in renamed.items()}, folder / "pytorch_model.bin")
    return folder


def lm_ref(weights: dict, config: Mamba2Config, tokens) -> np.ndarray:
    """float64 logits ``(L, vocab)`` of one sequence, from the math."""
    def rms(x, w):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + config.norm_eps) * w

    h = weights["backbone.embedding.weight"][np.asarray(tokens)]
    for i in range(config.num_layers):
        mixer = lm_config.mixer_weights(weights, i)
        out, _, _ = mixer_ref(mixer, config.dims, rms(h, weights[f"backbone.layers.{i}.norm.weight"]),
                              [0, len(tokens)], config.norm_eps)
        h = h + out
    head = weights.get("lm_head.weight", weights["backbone.embedding.weight"])
    return rms(h, weights["backbone.norm_f.weight"]) @ head.T


def load(side, path, **kwargs):
    model = side.impl.Mamba2LMHeadModel.from_pretrained(path, **kwargs)
    return model.to(side.device) if side.name == "torch" else model


def new_model(side, config, weights):
    model = side.impl.Mamba2LMHeadModel(config)
    model = model.to(side.device) if side.name == "torch" else model
    model.load_weights(weights)
    return model


def logits(side, model, ids: np.ndarray, mask=None) -> np.ndarray:
    if side.name == "torch":
        torch = side.torch
        with torch.no_grad():
            return side.numpy(model(torch.from_numpy(ids).to(side.device),
                                    None if mask is None else torch.from_numpy(mask).to(side.device)))
    return side.numpy(model(side.jnp.asarray(ids), mask))


def generate(side, model, ids: np.ndarray, n: int, mask=None, **options) -> np.ndarray:
    if side.name == "torch":
        torch = side.torch
        mask = None if mask is None else torch.from_numpy(mask).to(side.device)
        return model.generate(torch.from_numpy(ids).to(side.device), n, mask, **options).cpu().numpy()
    return np.asarray(model.generate(ids, n, mask, **options))


def greedy_reference(weights, config, prompt: np.ndarray, n: int) -> tuple[list[int], int]:
    """Greedy tokens of the float64 model, and how many of them are safe to
    compare (up to the first near tie of the top two logits, where float32
    may pick the other token and the sequences part)."""
    tokens = list(prompt)
    for step in range(n):
        last = lm_ref(weights, config, tokens)[-1]
        top2 = np.sort(last)[-2:]
        tokens.append(int(np.argmax(last)))
        if top2[1] - top2[0] < 1e-4 * max(1.0, abs(top2[1])):
            return tokens[len(prompt):], step + 1
    return tokens[len(prompt):], n


def until_eos(tokens, eos: int) -> list[int]:
    """``tokens`` with every one after the first ``eos`` replaced by ``eos``."""
    tokens = list(tokens)
    return tokens[:tokens.index(eos)] + [eos] * (len(tokens) - tokens.index(eos)) if eos in tokens else tokens


# --- config --------------------------------------------------------------------------

MAMBA2_2P7B = {"d_model": 2560, "d_intermediate": 0, "n_layer": 64, "vocab_size": 50277,
               "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
               "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
               "tie_embeddings": True}
HF_MAMBA2 = {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"], "vocab_size": 32768,
             "hidden_size": 4096, "num_hidden_layers": 64, "state_size": 128, "expand": 2, "num_heads": 128,
             "head_dim": 64, "n_groups": 8, "conv_kernel": 4, "chunk_size": 256, "use_bias": False,
             "use_conv_bias": True, "layer_norm_epsilon": 1e-5, "residual_in_fp32": True,
             "tie_word_embeddings": False, "rms_norm": True, "time_step_limit": [0.0, math.inf]}


def test_config_parses_both_published_layouts():
    config = Mamba2Config.from_dict(MAMBA2_2P7B)
    assert (config.vocab_size, config.hidden_size, config.num_layers) == (50288, 2560, 64)  # padded to 16
    assert (config.num_heads, config.head_dim, config.state_size, config.n_groups) == (80, 64, 128, 1)
    assert config.tie_embeddings and config.residual_in_fp32 and config.chunk_size == 256
    hf = Mamba2Config.from_dict(HF_MAMBA2)
    assert (hf.vocab_size, hf.hidden_size, hf.num_layers, hf.num_heads, hf.n_groups) == (32768, 4096, 64, 128, 8)
    assert not hf.tie_embeddings and hf.intermediate_size == 8192
    for layout in lm_config.LAYOUTS:
        assert Mamba2Config.from_dict(CONFIG.to_dict(layout)) == CONFIG


@pytest.mark.parametrize("raw, name", [
    ({"hidden_size": 8, "model_type": "mamba"}, "`config`"),  # Mamba-1 / unknown
    ({**MAMBA2_2P7B, "ssm_cfg": {}}, "`config.ssm_cfg.layer`"),
    ({**MAMBA2_2P7B, "attn_layer_idx": [3]}, "`config.attn_layer_idx`"),
    ({**MAMBA2_2P7B, "ssm_cfg": {"layer": "Mamba2", "D_has_hdim": True}}, "`config.ssm_cfg.D_has_hdim`"),
    ({**HF_MAMBA2, "num_heads": 64}, "`config.num_heads`"),
    ({**HF_MAMBA2, "time_step_limit": [0.0, 0.1]}, "`config.time_step_limit`"),
    ({**HF_MAMBA2, "head_dim": 48}, "`config.head_dim`"),
])
def test_bad_configs_raise(raw, name):
    with pytest.raises(ValueError, match=name):
        Mamba2Config.from_dict(raw)


def test_sampling_options_and_slots_are_checked():
    check = dict(max_new_tokens=4, temperature=0.0, top_k=None, top_p=None, seed=None, eos_token_id=None,
                 vocab_size=10)
    assert lm_config.check_sampling(**check).greedy
    for bad, name in ((dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                      (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(eos_token_id=10), "eos"),
                      (dict(max_new_tokens=-1), "max_new_tokens"), (dict(seed=1.5), "seed")):
        with pytest.raises(ValueError, match=f"`{name}"):
            lm_config.check_sampling(**{**check, **bad})
    assert 0 not in lm_config.allocate_slots(5)  # never the null block
    assert [lm_config.batch_bucket(b) for b in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]
    with pytest.raises(ValueError, match="`attention_mask`"):
        lm_config.prompt_layout((1, 4), np.array([[1, 0, 1, 0]]))


# --- loading and logits --------------------------------------------------------------

@pytest.mark.parametrize("layout, config", [pytest.param("mamba_ssm", TIED, marks=pytest.mark.slow(side="jax")),
                                            pytest.param("transformers", CONFIG, marks=pytest.mark.slow)])
def test_from_pretrained_matches_float64_reference(side, layout, config, rng, tmp_path):
    weights = random_lm_weights(rng, config)
    model = load(side, write_checkpoint(tmp_path, config, weights, layout))
    ids = rng.integers(0, config.vocab_size, (2, 21))
    got = logits(side, model, ids)
    assert got.shape == (2, 21, config.vocab_size)
    for row in range(2):
        assert_close(got[row], lm_ref(weights, config, ids[row]), "float32", f"{side.name} {layout} row {row}",
                     tol=1e-4)


def test_torch_reads_pytorch_model_bin_and_jax_refuses_it(rng, tmp_path):
    weights = random_lm_weights(rng, TIED)
    path = write_checkpoint(tmp_path, TIED, weights, "mamba_ssm", fmt="bin")
    torch_side = TorchSide()
    ids = rng.integers(0, TIED.vocab_size, (1, 9))
    assert_close(logits(torch_side, load(torch_side, path), ids)[0], lm_ref(weights, TIED, ids[0]), "float32",
                 tol=1e-4)
    with pytest.raises(ValueError, match="needs torch"):
        JaxSide().impl.Mamba2LMHeadModel.from_pretrained(path)


def test_bad_checkpoints_raise(side, rng, tmp_path):
    weights = random_lm_weights(rng, CONFIG)
    with pytest.raises(ValueError, match="no config.json"):
        load(side, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_dict("transformers")))
    with pytest.raises(ValueError, match="holds no weights"):
        load(side, tmp_path)
    cases = {"missing": ({k: v for k, v in weights.items() if k != "backbone.layers.1.mixer.D"},
                         "lacks `backbone.layers.1.mixer.D`"),
             "mis-shaped": ({**weights, "backbone.norm_f.weight": np.ones(3)}, "`backbone.norm_f.weight` has shape"),
             "unexpected": ({**weights, "backbone.layers.2.norm.weight": np.ones(16)}, "unexpected keys")}
    for name, (bad, message) in cases.items():
        path = write_checkpoint(tmp_path / name, CONFIG, bad, "transformers")
        with pytest.raises(ValueError, match=message):
            load(side, path)
    # The embedding under the other layout's name.
    path = write_checkpoint(tmp_path / "renamed", CONFIG, weights, "mamba_ssm")
    (path / "config.json").write_text(json.dumps(CONFIG.to_dict("transformers")))
    with pytest.raises(ValueError, match="lacks `backbone.embeddings.weight`"):
        load(side, path)


@pytest.mark.slow
def test_torch_and_flax_logits_agree_on_the_same_weights(rng):
    torch_side, jax_side = TorchSide(), JaxSide()
    torch_model = torch_side.impl.Mamba2LMHeadModel(CONFIG).to(torch_side.device)
    flax_model = jax_side.impl.Mamba2LMHeadModel(CONFIG)
    flax_model.load_weights(torch_model.checkpoint_weights())
    ids = rng.integers(0, CONFIG.vocab_size, (2, 19))
    want = logits(torch_side, torch_model, ids)
    assert_close(logits(jax_side, flax_model, ids), want, "float32", "flax vs torch")


@pytest.mark.slow(side="jax")
def test_padding_never_changes_the_tokens_logits(side, rng):
    """Right- and left-padded rows give their tokens the logits of the unpadded sequences."""
    weights = random_lm_weights(rng, TIED)
    model = new_model(side, TIED, weights)
    seqlen = 20
    ids = rng.integers(0, TIED.vocab_size, (3, seqlen))
    mask = np.zeros((3, seqlen), np.int32)
    mask[0, :13], mask[1, 14:], mask[2] = 1, 1, 1  # right padding, left padding, none
    got = logits(side, model, ids, mask)
    for row, (start, n) in enumerate(((0, 13), (14, 6), (0, 20))):
        assert_close(got[row, start:start + n], lm_ref(weights, TIED, ids[row, start:start + n]), "float32",
                     f"{side.name} row {row}", tol=1e-4)


@pytest.mark.slow
def test_training_step_reaches_every_parameter(rng):
    """The forward is differentiable: one cross-entropy backward gives every parameter a finite gradient."""
    side = TorchSide()
    torch = side.torch
    model = new_model(side, CONFIG, random_lm_weights(rng, CONFIG))
    ids = torch.from_numpy(rng.integers(0, CONFIG.vocab_size, (2, 12))).to(side.device)
    out = model(ids[:, :-1], torch.ones_like(ids[:, :-1]))
    torch.nn.functional.cross_entropy(out.flatten(0, 1), ids[:, 1:].flatten()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


# --- generation ----------------------------------------------------------------------

@pytest.mark.slow(side="jax")
def test_greedy_generation_of_prompts_of_different_lengths(side, rng):
    """A right-padded batch of prompts of different lengths: each row's greedy
    tokens are the float64 model's; with an eos token, a row is eos after it."""
    weights = random_lm_weights(rng, TIED)
    model = new_model(side, TIED, weights)
    lengths, n = [7, 3, 18], 4
    ids = rng.integers(0, TIED.vocab_size, (3, 18))
    mask = (np.arange(18)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    eos = int(ids[0, 0])
    got = generate(side, model, ids, n, mask, eos_token_id=eos)
    assert got.shape == (3, n)
    for row, length in enumerate(lengths):
        want, safe = greedy_reference(weights, TIED, ids[row, :length], n)
        assert got[row, :safe].tolist() == until_eos(want, eos)[:safe], f"{side.name} row {row}"


def test_jax_prefill_follows_weights_and_structure_changes(rng):
    """The Flax model's cached flattening (the jitted prefill takes its
    leaves): a new parameter value, a module assigned in place of another
    and a layer replaced in the layer list all reach the next prefill's
    logits (each against the float64 model of the weights it holds then)."""
    side = JaxSide()
    from jax_impl import mamba2_lm

    weights, other = random_lm_weights(rng, CONFIG), random_lm_weights(rng, CONFIG)
    model = new_model(side, CONFIG, weights)
    donor = new_model(side, CONFIG, other)  # built first: the layer swap below is the only change
    ids = rng.integers(0, CONFIG.vocab_size, (1, 9))

    def check(label):
        got = side.numpy(model.prefill(ids).logits)[0]
        assert_close(got, lm_ref(weights, CONFIG, ids[0])[-1], "float32", label)

    check("first prefill")
    assert mamba2_lm._FLAT[model].variables is not None, "the model's flattening is not cached"
    weights["backbone.norm_f.weight"] = 1 + 0.1 * rng.standard_normal(CONFIG.hidden_size)
    model.norm_f.weight.set_value(side.jnp.asarray(weights["backbone.norm_f.weight"], side.jnp.float32))
    check("a parameter's new value")
    weights["backbone.norm_f.weight"] = 1 + 0.1 * rng.standard_normal(CONFIG.hidden_size)
    norm = mamba2_lm.RMSNorm(CONFIG.hidden_size, CONFIG.norm_eps)
    norm.weight.set_value(side.jnp.asarray(weights["backbone.norm_f.weight"], side.jnp.float32))
    model.norm_f = norm
    check("a module assigned in place of another")
    model.layers[1] = donor.layers[1]
    weights.update({k: v for k, v in other.items() if k.startswith("backbone.layers.1.")})
    check("a layer replaced in the list")


def test_torch_generation_captures_while_jax_works_in_another_thread(rng):
    """The torch decode step is captured in a CUDA graph (once per generation:
    each has its own cache) while another thread of the process keeps JAX
    busy on the same GPU, as in a process using both frameworks: every
    capture succeeds and the tokens are those of a quiet process. On a CPU
    the step runs eagerly and this checks the tokens only."""
    import threading

    side = TorchSide()
    jnp = pytest.importorskip("jax.numpy")
    weights = random_lm_weights(rng, TIED)
    model = new_model(side, TIED, weights)
    ids = rng.integers(0, TIED.vocab_size, (2, 5))
    quiet = generate(side, model, ids, 3)
    stop, failures = threading.Event(), []

    def keep_jax_busy():
        x = jnp.ones((256, 256), jnp.float32)
        try:
            while not stop.is_set():
                x = (x @ x) * (1 / 256)
                x.block_until_ready()
        except Exception as error:  # noqa: BLE001  (reported by the test)
            failures.append(error)

    worker = threading.Thread(target=keep_jax_busy)
    worker.start()
    try:
        busy = [generate(side, model, ids, 3) for _ in range(2 if side.device.type == "cpu" else 6)]
    finally:
        stop.set()
        worker.join()
    assert not failures, failures
    for tokens in busy:
        np.testing.assert_array_equal(tokens, quiet)


@pytest.mark.slow  # the graph needs CUDA; on a CPU every prefill is eager (about 15 s)
def test_repeated_prefill_layout_replays_a_graph_with_eager_results(rng):
    """A prompt layout's second torch prefill is captured in a CUDA graph and
    later ones replay it: logits and written states equal the eager
    prefill's for new tokens of that layout, a replay leaves an earlier
    prefill's logits alone, and another layout runs eagerly. On a CPU every
    prefill is eager and this checks the results only."""
    side = TorchSide()
    torch = side.torch
    model = new_model(side, TIED, random_lm_weights(rng, TIED))
    mask = (np.arange(21)[None, :] < np.array([[21], [6]])).astype(np.int32)
    prompts = [rng.integers(0, TIED.vocab_size, (2, 21)) for _ in range(3)]

    def prefill(ids, layout_mask=mask):
        as_device = lambda a: torch.from_numpy(a).to(side.device)  # noqa: E731
        result = model.prefill(as_device(ids), as_device(layout_mask))
        states = [side.numpy(result.cache.torch(name, layer)[torch.from_numpy(result.slots).long()])
                  for layer in range(TIED.num_layers) for name in ("conv", "ssm")]
        return result.logits, states

    model.prefill_graphs = 0
    eager = [prefill(ids) for ids in prompts]
    model.prefill_graphs = 2
    replayed = [prefill(ids) for ids in prompts]  # eager, captured, replayed
    first_logits = side.numpy(replayed[1][0])
    prefill(prompts[0], np.ones((2, 21), np.int32))  # another layout
    same = dict(rtol=1e-5, atol=1e-6)  # the same kernels; cuBLAS may pick another algorithm in a capture
    for (want_logits, want_states), (got_logits, got_states) in zip(eager, replayed):
        np.testing.assert_allclose(side.numpy(got_logits), side.numpy(want_logits), **same)
        for got, want in zip(got_states, want_states):
            np.testing.assert_allclose(got, want, **same)
    np.testing.assert_array_equal(side.numpy(replayed[1][0]), first_logits)
    graphs = [p.graph is not None for p in model._prefills.values()]
    assert graphs == ([True, False] if side.device.type == "cuda" else [])


@pytest.mark.slow  # seven generations: about 30 s in the interpreters
def test_sampling_is_seeded_and_eos_stops_rows(side, rng):
    model = new_model(side, CONFIG, random_lm_weights(rng, CONFIG))
    ids = rng.integers(0, CONFIG.vocab_size, (2, 6))
    greedy = generate(side, model, ids, 6)
    hot = dict(temperature=5.0)  # near uniform over 40 tokens: two seeds agree with probability ~ 1e-19
    first, again = (generate(side, model, ids, 6, seed=7, **hot) for _ in range(2))
    np.testing.assert_array_equal(first, again, err_msg="same seed, same tokens")
    assert not np.array_equal(first, generate(side, model, ids, 6, seed=8, **hot)), "another seed"
    np.testing.assert_array_equal(generate(side, model, ids, 6, seed=3, top_k=1, **hot), greedy, "top_k=1")
    np.testing.assert_array_equal(generate(side, model, ids, 6, seed=3, top_p=1e-6, **hot), greedy, "top_p")
    eos = int(greedy[0, 2])
    want = [until_eos(row, eos) for row in greedy.tolist()]
    assert generate(side, model, ids, 6, eos_token_id=eos).tolist() == want, "eos"


def test_generation_refuses_bad_calls(side, rng):
    model = new_model(side, TIED, random_lm_weights(rng, TIED))
    ids = rng.integers(0, TIED.vocab_size, (2, 4))
    with pytest.raises(ValueError, match="`top_p`"):
        generate(side, model, ids, 3, top_p=2.0)
    with pytest.raises(ValueError, match="`attention_mask`"):
        generate(side, model, ids, 3, np.array([[1, 1, 0, 0], [0, 0, 0, 0]], np.int32))
    with pytest.raises(ValueError, match="`input_ids`"):
        model.generate(None, 3)


# --- across the frameworks -----------------------------------------------------------

def test_generation_continues_across_frameworks(rng, tmp_path):
    """Both frameworks load one Hugging Face-layout checkpoint; prefill in
    torch and decode in Flax on one shared MambaStateCache, and the reverse:
    the greedy tokens equal torch alone and Flax alone."""
    torch_side, jax_side = TorchSide(), JaxSide()
    torch = torch_side.torch
    config = Mamba2Config(**{**TIED.__dict__, "tie_embeddings": False})
    path = write_checkpoint(tmp_path, config, random_lm_weights(rng, config), "transformers")
    torch_model, flax_model = load(torch_side, path), load(jax_side, path)
    ids = rng.integers(0, config.vocab_size, (2, 9))
    mask = np.ones((2, 9), np.int32)
    mask[1, 5:] = 0
    n = 3
    want = generate(torch_side, torch_model, ids, n, mask)
    np.testing.assert_array_equal(generate(jax_side, flax_model, ids, n, mask), want, "flax alone")

    ids_t, mask_t = torch.from_numpy(ids).to(torch_side.device), torch.from_numpy(mask).to(torch_side.device)
    prefilled = torch_model.prefill(ids_t, mask_t)
    got = np.asarray(flax_model.generate(max_new_tokens=n, prefilled=prefilled))
    np.testing.assert_array_equal(got, want, "torch prefill, flax decode")
    with pytest.raises(ValueError, match="`prefilled`"):
        torch_model.generate(max_new_tokens=n, prefilled=prefilled)

    cache = torch_model.new_cache(2)
    prefilled = flax_model.prefill(ids, mask, cache=cache)
    assert prefilled.cache is cache
    got = torch_model.generate(max_new_tokens=n, prefilled=prefilled).cpu().numpy()
    np.testing.assert_array_equal(got, want, "flax prefill, torch decode")


# --- Hugging Face transformers ---------------------------------------------------------

@pytest.mark.slow
def test_logits_match_transformers_mamba2(rng, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch_side = TorchSide()
    torch = torch_side.torch
    config = Mamba2Config(**{**CONFIG.__dict__, "n_groups": 1})  # one group: HF's grouped norm varies by version
    weights = random_lm_weights(rng, config)
    path = write_checkpoint(tmp_path, config, weights, "transformers")
    hf = transformers.Mamba2ForCausalLM.from_pretrained(path, torch_dtype=torch.float32).to(torch_side.device)
    ids = rng.integers(0, config.vocab_size, (2, 21))
    with torch.no_grad():
        want = torch_side.numpy(hf(torch.from_numpy(ids).to(torch_side.device)).logits)
    assert_close(want[0], lm_ref(weights, config, ids[0]), "float32", "transformers vs float64", tol=1e-4)
    assert_close(logits(torch_side, load(torch_side, path), ids), want, "float32", "ours vs transformers",
                 tol=1e-4)


# --- the experiments ---------------------------------------------------------------------

@pytest.mark.slow  # about a minute each in the interpreters
def test_generation_benchmark_quick_writes_record_and_plot(tmp_path):
    from experiments import generate as bench

    record = bench.main(["--quick", "--output", tmp_path / "generate.json"])
    rows = [r for r in record["rows"] if r["op"] == "generate"]
    assert {r["implementation"] for r in rows} == {"torch", "jax"}
    assert all(r["prompt_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows)
    assert all(ratio["greedy_tokens_agree"] == 1.0 for ratio in record["torch_vs_jax"])  # float32 on CPU
    assert (tmp_path / "generate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "decode tokens/s" in (tmp_path / "generate.md").read_text()


@pytest.mark.slow
def test_train_tiny_quick_starts_both_frameworks_from_one_loss(tmp_path):
    from experiments import train_tiny

    results = train_tiny.main(["--quick", "--plot", str(tmp_path / "loss.png")])
    assert len(results["torch"]) == len(results["jax"]) == 3
    np.testing.assert_allclose(results["torch"], results["jax"], rtol=1e-3)  # same weights, same batches
    assert (tmp_path / "loss.png").exists()


def test_recall_task_asks_listed_keys():
    from experiments.train_tiny import TINY, recall_batches

    tokens, targets, mask = next(recall_batches(TINY, 1, seed=int(np.random.default_rng().integers(1 << 30))))
    pairs = TINY["pairs"]
    for row in range(TINY["batch"]):
        listed = dict(zip(tokens[row, 0:2 * pairs:2].tolist(), tokens[row, 1:2 * pairs:2].tolist()))
        for t in np.flatnonzero(mask[row]):
            assert listed[int(tokens[row, t])] == targets[row, t]  # the answer to the key just asked
