"""Observation/action windows with padding by repetition at episode borders."""

import numpy as np
import pytest

from ditvla.datasets.sequence_sampler import SequenceSampler


def test_windows_and_padding_at_episode_borders():
    # Episodes [0, 3) and [3, 8).
    sampler = SequenceSampler(np.array([3, 8]), n_obs_steps=2, horizon=4)
    assert len(sampler) == 8
    f = sampler.frames([0, 2, 3, 7])
    assert f.anchor.tolist() == [0, 2, 3, 7]
    assert f.episode.tolist() == [0, 0, 1, 1]
    assert f.obs.tolist() == [[0, 0], [1, 2], [3, 3], [6, 7]]
    assert f.obs_is_pad.tolist() == [[True, False], [False, False], [True, False], [False, False]]
    assert f.action.tolist() == [[0, 1, 2, 2], [2, 2, 2, 2], [3, 4, 5, 6], [7, 7, 7, 7]]
    assert f.action_is_pad.tolist() == [
        [False, False, False, True],
        [False, True, True, True],
        [False, False, False, False],
        [False, True, True, True],
    ]


def test_episode_subset_only_draws_from_those_episodes():
    sampler = SequenceSampler(np.array([3, 8, 10]), n_obs_steps=1, horizon=2, episodes=[2, 0])
    assert len(sampler) == 5
    f = sampler.frames(np.arange(5))
    assert f.anchor.tolist() == [8, 9, 0, 1, 2]
    assert set(f.episode.tolist()) == {0, 2}
    # Windows never cross into an unselected episode.
    assert f.action.max() <= 9 and not np.any((f.action >= 3) & (f.action < 8))


def test_bad_arguments():
    with pytest.raises(ValueError, match="horizon"):
        SequenceSampler(np.array([3]), n_obs_steps=1, horizon=0)
    with pytest.raises(IndexError):
        SequenceSampler(np.array([3]), n_obs_steps=1, horizon=2, episodes=[1])
    with pytest.raises(IndexError):
        SequenceSampler(np.array([3]), n_obs_steps=1, horizon=2).frames([3])
