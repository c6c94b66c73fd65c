"""Model sources: the embedded default, a local .gguf file, a local HF directory, a hub id."""

import pytest
import torch

from aapo_app.errors import AapoError
from aapo_app.models import EMBEDDED_DEFAULT, _smollm2_gguf, load_causal_lm, resolve_model_path


def test_resolve_checks_paths_without_converting(tmp_path):
    assert resolve_model_path(EMBEDDED_DEFAULT, convert=False).endswith(".gguf")
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct", convert=False) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(AapoError, match="model.path: '/nope/model' does not exist"):
        resolve_model_path("/nope/model")
    with pytest.raises(AapoError, match="no GGUF file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AapoError, match="has no config.json"):
        resolve_model_path(str(tmp_path / "empty"))


def test_embedded_default_is_a_plain_fp32_checkpoint(smollm2_dir):
    model = load_causal_lm(str(smollm2_dir))
    assert model.config.model_type == "llama" and getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, tied embeddings


@pytest.mark.slow
def test_gguf_file_converts_to_the_same_model(tmp_path, monkeypatch, smollm2_dir):
    """A .gguf path is de-quantised once into the cache and gives the embedded default's logits."""
    monkeypatch.setenv("AAPO_CACHE", str(tmp_path / "cache"))
    path = resolve_model_path(str(_smollm2_gguf()))
    assert str(tmp_path / "cache") in path
    assert resolve_model_path(str(_smollm2_gguf())) == path  # cached: no second conversion
    ids = torch.tensor([[1, 504, 3458, 314, 2253, 47]])
    with torch.no_grad():
        a = load_causal_lm(path)(ids).logits
        b = load_causal_lm(str(smollm2_dir))(ids).logits
    assert torch.equal(a, b)
