"""The first training loop: the tiny parent learns the embedded corpus."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.train import run

from conftest import REPO


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "recipes"), version_base=None):
        return compose(config_name="pretrain", overrides=list(overrides))


def test_tiny_pretrain_learns_the_corpus():
    result = run(_cfg("trainer.max_steps=40", "trainer.log_interval=20", "data.max_bytes=500000"))
    losses = result["train_losses"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]
    # Better than the best context-free model of the same bytes.
    assert result["valid_loss"] < result["unigram_entropy"]


@pytest.mark.parametrize("override,key", [("trainer.max_steps=0", "trainer.max_steps"), ("trainer.lr=-1", "trainer.lr"),
                                          ("model.vocab_size=128", "model.vocab_size")])
def test_bad_trainer_values_fail_before_training(override, key):
    with pytest.raises(ConfigError) as err:
        run(_cfg(override))
    assert err.value.key == key
