"""The inner task suite and the LRControl-v0 environment."""

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs
from controller.features import CLIP, N_FEATURES
from envs import (
    FAMILIES, LOCAL_FAMILIES, TEST_FAMILIES, TRAIN_FAMILIES, VALIDATION_FAMILIES, EnvConfig, TorchRun, get_family,
)


def make_env(family: str, **kwargs) -> envs.LRControlEnv:
    return gym.make("LRControl-v0", config=EnvConfig(families=(family,), **kwargs)).unwrapped


def test_suite_shape():
    assert len(FAMILIES) >= 8
    splits = [set(TRAIN_FAMILIES), set(VALIDATION_FAMILIES), set(TEST_FAMILIES), set(LOCAL_FAMILIES)]
    assert sum(map(len, splits)) == len(FAMILIES) and set.union(*splits) == set(FAMILIES)  # disjoint, complete
    kinds = {get_family(f).kind for f in FAMILIES}
    assert kinds == {"classification", "regression"}
    with pytest.raises(ValueError, match="unknown task family 'nope'"):
        get_family("nope")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_env_checkers_pass_without_warnings(family):
    env = make_env(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(env)
        sb3_check_env(env, warn=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_at_default_lr(family):
    fam = get_family(family)
    run = TorchRun(fam.default_task(seed=0))
    initial, _ = run.evaluate("val")
    results = [run.run_epoch() for _ in range(4)]
    losses = [r.train_loss for r in results]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    assert results[-1].val_loss < initial
    test_loss, test_acc = run.evaluate("test")
    assert math.isfinite(test_loss)
    assert (test_acc is None) == (fam.kind == "regression")
    assert results[-1].stats.steps == math.ceil(run.task.data.x_train.shape[0] / run.config.batch_size)


def rollout(env, seed, actions, options=None):
    obs, info = env.reset(seed=seed, options=options)
    out = [(obs, info)]
    for a in actions:
        obs, r, term, trunc, info = env.step(np.array([a], dtype=np.float32))
        out.append((obs, r, info))
        if term or trunc:
            break
    return out


def test_same_seed_same_trajectory():
    env = make_env("digits_mlp")
    actions = [0.5, -0.3, 1.0, 0.0]
    a, b = rollout(env, 7, actions), rollout(env, 7, actions)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x[0], y[0])
        assert x[-1] == y[-1]
    c = rollout(env, 8, actions)
    assert not np.array_equal(a[-1][0], c[-1][0])


def test_reset_does_not_touch_global_torch_rng():
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_env("breast_cancer_mlp").reset(seed=0)
    np.testing.assert_array_equal(torch.rand(3), expected)


def test_huge_lr_ends_episode_cleanly_with_penalty():
    env = make_env("digits_mlp", divergence_penalty=3.0)
    obs, info = env.reset(seed=0, options={"lr_multiplier": 1e4})
    assert np.isfinite(obs).all()
    total, terminated, steps = 0.0, False, 0
    while not terminated:
        obs, reward, terminated, truncated, info = env.step(np.array([1.0], dtype=np.float32))
        assert np.isfinite(obs).all() and math.isfinite(reward)
        total += reward
        steps += 1
        assert not truncated, "a x1e4 LR must diverge, not run out its budget"
    assert info["diverged"]
    assert total == pytest.approx(-3.0)
    with pytest.raises(RuntimeError, match=r"episode ended \(it diverged.*call reset\(\)"):
        env.step(np.array([0.0], dtype=np.float32))  # no second penalty, no epoch from a diverged model


def test_action_scales_every_group_and_return_telescopes():
    env = make_env("friedman_mlp")
    obs, info = env.reset(seed=3, options={"lr_multiplier": 1.0})
    first_val, lr0 = info["val_loss"], info["lr"]
    total = 0.0
    obs, r, term, trunc, info = env.step(np.array([1.0], dtype=np.float32))
    total += r
    assert info["lr"] == pytest.approx(2 * lr0)
    obs, r, term, trunc, info = env.step(np.array([-1.0], dtype=np.float32))
    total += r
    assert info["lr"] == pytest.approx(lr0)
    while not (term or trunc):
        obs, r, term, trunc, info = env.step(np.array([0.0], dtype=np.float32))
        total += r
    assert trunc and not term
    assert info["epoch"] == env.episode.task.epochs
    assert total == pytest.approx(math.log(first_val / info["val_loss"]), rel=1e-6)


def test_vs_cosine_return_is_the_log_ratio_to_cosine_on_the_same_task():
    from envs.evaluation import run_schedule

    env = make_env("diabetes_mlp", reward="vs_cosine")
    obs, info = env.reset(seed=5, options={"lr_multiplier": 1.0})
    cosine = run_schedule(env.episode.task, "cosine").val_losses
    assert info["val_loss"] == cosine[0]  # the first epoch runs at the initial LR in both
    total, term, trunc, actions = 0.0, False, False, iter([1.0, 1.0, -0.5])
    while not (term or trunc):
        obs, r, term, trunc, info = env.step(np.array([next(actions, 0.0)], dtype=np.float32))
        total += r
    assert trunc and len(cosine) == info["epoch"]
    assert total == pytest.approx(math.log(cosine[-1] / info["val_loss"]), rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="reward must be 'log_val' or 'vs_cosine'"):
        EnvConfig(reward="vs_constant")  # type: ignore[arg-type]


def test_an_action_of_another_shape_is_a_value_error():
    env = make_env("diabetes_mlp")
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"an action is one number .* got shape \(2,\)"):
        env.step(np.array([0.1, 0.2], dtype=np.float32))
    env.step(np.float32(0.5))  # a bare number is one action too


def test_observation_is_fixed_length_and_bounded():
    env = make_env("tokens_attention")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (N_FEATURES,) and obs.dtype == np.float32
    assert np.all(np.abs(obs) <= CLIP)


def test_sampled_tasks_span_three_decades_of_lr():
    fam = get_family("digits_mlp")
    rng = np.random.default_rng(0)
    tasks = [fam.sample(rng) for _ in range(400)]
    ratios = np.log10([t.lr / fam.default_lr(t.optimizer) for t in tasks])  # around each optimizer's own default
    assert -1.5 <= ratios.min() < -1.3 and 1.3 < ratios.max() <= 1.5
    assert {t.optimizer for t in tasks} == {"sgd", "adam", "adamw"}
    assert min(t.epochs for t in tasks) == 10 and max(t.epochs for t in tasks) == 40  # both ends of the range
    # the practitioner's task: middle width, depth and batch size, the middle of the budget, the default optimizer
    assert fam.default_task(seed=7) == envs.TaskConfig("digits_mlp", 7, "adam", 1e-3, 25, 64, 128, 2)


def test_bad_reset_options_and_config_are_refused():
    env = make_env("digits_mlp")
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(seed=0, options={"famliy": "digits_mlp"})
    with pytest.raises(ValueError, match="unknown task family"):
        EnvConfig(families=("not_a_family",))
    with pytest.raises(ValueError, match="families is empty"):
        EnvConfig(families=[])
    for bad in ({"divergence_penalty": math.nan}, {"divergence_penalty": math.inf}, {"lr_multiplier": -1.0},
                {"lr_multiplier": 0.0}, {"lr_multiplier": math.nan}, {"num_threads": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):  # named, not torch's words later
            EnvConfig(**bad)
    with pytest.raises(ValueError, match=r"lr_multiplier must be a positive finite number \(or None\), got -1"):
        env.reset(seed=0, options={"lr_multiplier": -1.0})
    task = env.sample_task({"family": "digits_mlp"})
    with pytest.raises(ValueError, match=r"'task' fixes the whole task: \['family'\] would be ignored"):
        env.reset(seed=0, options={"task": task, "family": "wine_mlp"})
    # one name alone is that family, not its letters; a list is kept as a (hashable) tuple
    assert EnvConfig(families="digits_mlp").families == ("digits_mlp",)  # type: ignore[arg-type]
    pair = EnvConfig(families=["digits_mlp", "wine_mlp"])  # type: ignore[arg-type]
    assert pair.families == ("digits_mlp", "wine_mlp")
    with pytest.raises(ValueError, match="families must be ordered"):  # a set's order depends on PYTHONHASHSEED
        EnvConfig(families={"digits_mlp", "wine_mlp"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="action must be a controller.actions.ActionConfig"):
        EnvConfig(action=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="budget_is_terminal must be True or False"):
        EnvConfig(budget_is_terminal="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reset option 'task' must be an envs.TaskConfig, got 'wine_mlp'"):
        env.reset(seed=0, options={"task": "wine_mlp"})
    with pytest.raises(ValueError, match="reset option 'family' must be one family's name"):
        env.reset(seed=0, options={"family": ["wine_mlp"]})
    env.reset(seed=0, options={"task": task})
    for action in (None, "0.5"):
        with pytest.raises(ValueError, match="an action is one number"):
            env.step(action)
    assert env.render() is None
    env.close()
    with pytest.raises(RuntimeError, match=r"call reset\(\) before step\(\)"):  # closed: its inner run is freed
        env.step(np.zeros(1, dtype=np.float32))


@pytest.mark.parametrize("terminal", [True, False])
def test_the_budget_ends_an_episode_terminated_for_rl_training_else_truncated(terminal):
    env = make_env("breast_cancer_mlp", budget_is_terminal=terminal)
    env.reset(seed=0)
    done = False
    while not done:
        _, _, terminated, truncated, info = env.step(np.zeros(1, dtype=np.float32))
        assert (terminated, truncated) in ((False, False), (terminal, not terminal))
        done = terminated or truncated
    assert info["epoch"] == env.episode.task.epochs and not info["diverged"]
    with pytest.raises(RuntimeError, match=r"used its budget of \d+ epochs.*call reset\(\)"):
        env.step(np.zeros(1, dtype=np.float32))  # an epoch past the budget would read progress > 1
    assert env.episode.epoch == info["epoch"]  # refused before training
    env.reset(seed=1)
    env.step(np.zeros(1, dtype=np.float32))  # a reset starts the next episode


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_exit_with_ends_a_worker_when_its_parent_ends(pidfd):
    """``exit_with`` ends the calling process once the watched one has exited, through a pidfd or, where
    the platform has none, by polling; while the watched process lives, the worker lives."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    parent = subprocess.Popen(["sleep", "2"])
    code = (f"import os, time\nif not {pidfd}:\n    del os.pidfd_open\n"
            f"from envs.evaluation import exit_with\nexit_with({parent.pid})\ntime.sleep(60)\n")
    worker = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent)
    try:
        time.sleep(1.0)
        assert worker.poll() is None, "the worker ended while the watched process was alive"
        parent.wait()
        worker.wait(timeout=10)  # within a second of the parent's exit (polling), at once with a pidfd
        assert worker.returncode == 1
    finally:
        worker.kill()


@pytest.mark.parametrize(
    "change, message",
    [({"epochs": 1}, "epochs must be an int >= 2"), ({"batch_size": 0}, "batch_size must be an int >= 1"),
     ({"width": 0}, "width must be an int >= 1"), ({"depth": -1}, "depth must be an int >= 0"),
     ({"seed": 1.5}, "seed must be an int"), ({"depth": True}, "depth must be an int >= 0, got True"),
     ({"lr": math.nan}, "lr must be a positive finite number"),
     ({"lr": 0.0}, "lr must be a positive finite number"), ({"optimizer": "rmsprop"}, "optimizer must be one of"),
     ({"family": "nope"}, "unknown task family 'nope'")],
)
def test_a_task_config_names_what_is_wrong_with_it(change, message):
    """A hand-made task that cannot run is refused when built, not with an IndexError or a zero division later."""
    from dataclasses import replace

    task = get_family("diabetes_mlp").sample(np.random.default_rng(0))
    with pytest.raises(ValueError, match=message):
        replace(task, **change)


def test_episode_applies_the_safety_rule():
    """The env's decisions cut on a finite blow-up over the best validation loss, and hold while it stays worse."""
    from envs.inner import EpochResult
    from envs.lr_env import Episode
    from controller.signals import StepStats

    task = get_family("diabetes_mlp").default_task(seed=0)
    episode = Episode(task, EnvConfig(families=("diabetes_mlp",)))

    def result(val):
        return EpochResult(val, val, None, StepStats.empty())

    episode.start(5.0, result(1.0), task.lr)
    episode.advance(result(0.9), task.lr)
    episode.advance(result(1.9), task.lr)  # over 2x the best, 0.9
    assert episode.decide(task.lr, 1.0) == pytest.approx(task.lr * 0.25) and episode.cut
    episode.advance(result(1.2), task.lr)  # over 1.25x the best: an action of +1 is held
    assert episode.decide(task.lr, 1.0) == pytest.approx(task.lr) and not episode.cut


def test_info_reports_non_finite_values_as_inf_and_no_accuracy_as_minus_one():
    """info stays comparable across seeded runs (NaN != NaN): a NaN loss or an unobserved gradient norm reads inf."""
    from envs.inner import EpochResult
    from envs.lr_env import Episode
    from controller.signals import StepStats

    task = get_family("diabetes_mlp").default_task(seed=0)
    episode = Episode(task, EnvConfig(families=("diabetes_mlp",)))
    _, info = episode.start(5.0, EpochResult(math.nan, math.inf, None, StepStats.empty()), task.lr)
    assert info["diverged"]
    assert (info["train_loss"], info["val_loss"], info["grad_norm"], info["val_accuracy"]) == (
        math.inf, math.inf, math.inf, -1.0)


def test_a_validation_loss_of_exactly_zero_is_a_finite_reward():
    """A classifier that gets every validation sample right by a wide margin reaches a float32 loss of 0 (wine at a
    high LR does): the reward takes the log of it, and must stay finite rather than raise."""
    from envs.inner import EpochResult
    from envs.lr_env import Episode
    from controller.signals import StepStats

    task = get_family("wine_mlp").default_task(seed=0)
    episode = Episode(task, EnvConfig(families=("wine_mlp",)))
    episode.start(1.1, EpochResult(0.5, 0.0, 1.0, StepStats.empty()), task.lr)  # 0 at the first epoch, too
    obs, reward, terminated, _, info = episode.advance(EpochResult(0.1, 0.0, 1.0, StepStats.empty()), task.lr)
    assert reward == 0.0 and not terminated and not info["diverged"] and np.isfinite(obs).all()
    _, reward, *_ = episode.advance(EpochResult(0.1, 0.2, 0.9, StepStats.empty()), task.lr)
    assert reward == -50.0  # ln(1e-30 / 0.2), clipped like every reward


def test_divergence_after_some_steps_returns_minus_the_penalty():
    """Diverging mid-episode undoes the return so far: the episode's return is exactly -penalty."""
    env = make_env("digits_mlp", divergence_penalty=3.0)
    env.reset(seed=0, options={"lr_multiplier": 30.0})
    assert not env.episode.diverged  # the first epoch survives: the divergence comes from the agent's rises
    total, steps, term, trunc = 0.0, 0, False, False
    while not (term or trunc):
        _, reward, term, trunc, info = env.step(np.array([1.0], dtype=np.float32))
        total += reward
        steps += 1
    assert term and not trunc and info["diverged"] and steps > 1
    assert total == pytest.approx(-3.0)
    with pytest.raises(RuntimeError, match="episode ended"):
        env.step(np.array([0.0], dtype=np.float32))


def test_an_env_mid_episode_pickles_and_goes_on_as_the_original():
    """Registered families pickle by name (their factories are lambdas), so a running env does: its copy makes the
    same next steps (model, optimizer, data order and signals included)."""
    import pickle

    env = make_env("digits_mlp")
    env.reset(seed=0)
    env.step(np.zeros(1, dtype=np.float32))
    copy = pickle.loads(pickle.dumps(env))
    assert copy.run.task.family is get_family("digits_mlp")
    for a in (0.5, -1.0):
        action = np.full(1, a, dtype=np.float32)
        (obs, reward, *_), (obs_copy, reward_copy, *_) = env.step(action), copy.step(action)
        np.testing.assert_array_equal(obs_copy, obs)
        assert reward_copy == reward


def test_an_epoch_range_sets_every_budget_and_changes_no_other_draw():
    from dataclasses import replace

    from envs.batched import make_vec_env
    from envs.tasks import check_epoch_range

    for family in ("digits_cnn", "tokens_attention", "wine_mlp"):
        fam = get_family(family)
        for seed in range(5):
            plain = fam.sample(np.random.default_rng(seed))
            long = fam.sample(np.random.default_rng(seed), epochs=(100, 100))
            assert long == replace(plain, epochs=100)
    budgets = {get_family("blobs_mlp").sample(np.random.default_rng(s), epochs=(50, 52)).epochs for s in range(60)}
    assert budgets == {50, 51, 52}
    for bad in ((0, 5), (1, 5), (6, 5), (5,), (1, 2, 3), "5", (1.0, 2), (True, 2)):
        with pytest.raises(ValueError, match="an epoch budget range must be two ints"):
            check_epoch_range(bad)
        with pytest.raises(ValueError, match="an epoch budget range must be two ints"):
            EnvConfig(epochs=bad)
    assert EnvConfig(epochs=[3, 4]).epochs == (3, 4)  # a list (from JSON) becomes a tuple
    # both environment paths: LRControlEnv and the batched vector env end their episodes at the range's budgets
    env = make_env("digits_cnn", epochs=(3, 4))
    ends = set()
    for seed in range(4):
        env.reset(seed=seed)
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step(np.zeros(1, dtype=np.float32))
            done = terminated or truncated
        ends.add(info["epoch"])
    assert ends <= {3, 4} and ends
    venv = make_vec_env(("diabetes_mlp",), n_envs=2, config=EnvConfig(families=("diabetes_mlp",), epochs=(5, 5)),
                        seed=0)
    venv.reset()
    dones = np.zeros(2, dtype=bool)
    while not dones.any():
        _, _, dones, infos = venv.step(np.zeros((2, 1), dtype=np.float32))
    assert dones.all() and [i["epoch"] for i in infos] == [5, 5]
    venv.close()


def test_every_sample_lands_in_exactly_one_split():
    from envs.tasks import _split, mnist1d

    ids = np.arange(1000, dtype=np.float64)[:, None]  # a sample's id as its one feature (distinct after scaling)
    splits = _split(ids, np.zeros(1000, dtype=np.int64), regression=False)
    parts = [splits.x_train, splits.x_val, splits.x_test]
    assert [len(part) for part in parts] == [600, 200, 200]
    assert len(set(torch.cat(parts).flatten().tolist())) == 1000
    data = mnist1d()  # its own split: the last 1000 of the library's training set validate; its test set tests
    rows = [{row.tobytes() for row in part.numpy()} for part in (data.x_train, data.x_val, data.x_test)]
    assert [len(r) for r in rows] == [3000, 1000, 1000]
    assert not rows[0] & rows[1] and not rows[0] & rows[2] and not rows[1] & rows[2]


def test_generating_mnist1d_leaves_the_global_rngs_alone():
    import random

    from envs.tasks import mnist1d

    random.seed(1)
    np.random.seed(1)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    mnist1d.__wrapped__()  # past the cache: generated now
    assert random.getstate() == python_state
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:]


def test_synthetic_datasets_hold_what_their_docstrings_say():
    from envs.tasks import TOKEN_VOCAB, adding, tokens_mode

    tokens = tokens_mode()  # the class is the most frequent symbol (ties: the lowest)
    for x, y in ((tokens.x_train, tokens.y_train), (tokens.x_val, tokens.y_val), (tokens.x_test, tokens.y_test)):
        counts = torch.nn.functional.one_hot(x, TOKEN_VOCAB).sum(1)
        assert torch.equal(y, counts.argmax(1))
    data = adding()  # two marked steps per sequence; the target is the sum of their values
    x, y = torch.cat([data.x_train, data.x_val, data.x_test]), torch.cat([data.y_train, data.y_val, data.y_test])
    marked = x[..., 1] > 0  # standardised per step: a marker's 1 is above that step's mean, its 0 below
    assert (marked.sum(1) == 2).all()
    marked_sum = (x[..., 0] * marked).sum(1)  # the values, standardised per step (about the same scale at each)
    assert np.corrcoef(marked_sum.numpy(), y[:, 0].numpy())[0, 1] > 0.99


def test_conv_layers_double_their_channels():
    from envs.tasks import Conv2dNet

    net = Conv2dNet(8, 10, width=4, depth=3)
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 4), (4, 8), (8, 16)]
    assert net.head.in_features == 16 * 4 * 4  # after the 2x2 max-pool of 8x8 images


def test_attention_block_attends_as_torchs_scaled_dot_product_attention():
    """The block writes attention out (deterministic on CUDA); it must be softmax(q k^T / sqrt(d_head)) v."""
    from envs.tasks import AttentionBlock

    torch.manual_seed(0)
    block, x = AttentionBlock(16, heads=4), torch.randn(3, 5, 16)
    q, k, v = block.qkv(block.norm1(x)).reshape(3, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    h = x + block.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 5, 16))
    torch.testing.assert_close(block(x), h + block.mlp(block.norm2(h)))


def test_a_feature_constant_in_training_is_zero_in_every_split():
    """An input no training sample varies (an image border no training image inks) is 0 everywhere; it used to be
    divided by 1e-6 where a validation or test sample differed (255 became 2.55e8)."""
    from envs.tasks import _standardize

    x_train = np.array([[1.0, 0.0], [3.0, 0.0]])
    x_other = np.array([[3.0, 255.0]])
    labels = np.array([0, 1])
    splits = _standardize([(x_train, labels), (x_other, labels[:1]), (x_other, labels[:1])], regression=False)
    assert splits.x_train.flatten().tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], rel=1e-5)
    assert splits.x_val.flatten().tolist() == splits.x_test.flatten().tolist() == pytest.approx([1.0, 0.0], rel=1e-5)


def test_torch_run_set_lr_scales_every_param_group_by_the_first_groups_factor():
    """The env's action moves the first group's LR; other groups (none in the bundled families, any in a user's task)
    keep their ratio to it, as PolicyScheduler keeps them."""
    run = TorchRun(get_family("diabetes_mlp").default_task(seed=0), hook=False)
    lr = run.lr
    run.task.optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr / 10})
    run.set_lr(4 * lr)
    assert [g["lr"] for g in run.task.optimizer.param_groups] == pytest.approx([4 * lr, 0.4 * lr])
    assert run.lr == pytest.approx(4 * lr)
