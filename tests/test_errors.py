"""Bad input gets an error that says what is wrong and what to do."""

from __future__ import annotations

import pytest
from transformers import BertConfig, BertForMaskedLM

from edge_runtime.model.config import CoMiGSConfig, ConfigError
from edge_runtime.model.inject import UnsupportedModelError, inject_comigs
from edge_runtime.model.loading import ModelSourceError, load_base_model

from tests.builders import tiny_base


def test_unsupported_architecture():
    model = BertForMaskedLM(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'bert'.*gpt2.*llama"):
        inject_comigs(model, CoMiGSConfig())


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_must_be_positive(rank):
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        CoMiGSConfig(rank=rank)


def test_at_least_one_expert():
    with pytest.raises(ConfigError, match="at least one expert"):
        CoMiGSConfig(n_generalists=0, n_specialists=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(n_generalists=-1), "must be >= 0"),
    (dict(top_k=3, n_specialists=1), "top_k must be between 1 and"),
    (dict(generalist_share=1.0), "generalist_share"),
    (dict(rank=2.5), "must be an integer"),
])
def test_other_bad_configs(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CoMiGSConfig(**kwargs)


@pytest.mark.parametrize("spec", ["1", "a,b", "1,1,1"])
def test_bad_experts_spec(spec):
    with pytest.raises(ConfigError, match="G,S"):
        CoMiGSConfig.parse_experts(spec)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_base_model(tmp_path / "nope.gguf")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        load_base_model(tmp_path)


def test_injecting_twice_is_refused():
    model = inject_comigs(tiny_base(), CoMiGSConfig())
    with pytest.raises(ValueError, match="already has CoMiGS experts"):
        inject_comigs(model, CoMiGSConfig())
