"""Learnability against the learner's own best loss (`irreducible_loss=learner_best`): a sample
the learner has slid back on, or has never seen, beats one it still knows; no reference needed."""

from __future__ import annotations

import numpy as np
import pytest

from loader.errors import ConfigError
from loader.ids import make_ids
from loader.selection.options import SelectionOptions, parse_options
from loader.selection.selector import Selector


def selector(irreducible: str) -> Selector:
    options = SelectionOptions(keep_ratio=2 / 3, irreducible_loss=irreducible)
    return Selector("learnability", options, batch_size=2, seed=0)


def test_forgotten_and_unseen_samples_beat_a_learnt_one_without_a_reference():
    chooser = selector("learner_best")
    assert not chooser.needs_scores  # no reference model, no embeddings: nothing to score
    assert chooser.add_shard(0, 3, None) == ""
    ids = make_ids(0, 3)  # 0: learnt and still known, 1: learnt then forgotten, 2: never seen
    assert chooser.feedback(ids[:2], np.array([2.0, 0.1], np.float32)) == ""
    assert chooser.feedback(ids[:2], np.array([0.1, 2.0], np.float32)) == ""
    np.testing.assert_allclose(chooser.pool.best_learner_loss(ids)[:2], [0.1, 0.1])
    chosen = chooser.select(ids, None, np.random.default_rng(0), None)
    assert sorted(chosen.kept.tolist()) == ids[1:].tolist()


def test_best_losses_survive_the_selector_state():
    chooser = selector("learner_best")
    chooser.add_shard(0, 3, None)
    ids = make_ids(0, 3)
    chooser.feedback(ids, np.array([0.5, 0.2, 0.9], np.float32))
    chooser.feedback(ids, np.array([0.7, 0.1, 1.5], np.float32))
    again = selector("learner_best")
    again.reset(chooser.get_state())
    np.testing.assert_array_equal(again.pool.best_learner_loss(ids), np.array([0.5, 0.1, 0.9], np.float32))


def test_the_reference_is_still_the_default_and_a_bad_value_names_the_option():
    assert selector("reference").needs_scores
    with pytest.raises(ConfigError, match="selection.irreducible_loss"):
        parse_options({"irreducible_loss": "oracle"})
