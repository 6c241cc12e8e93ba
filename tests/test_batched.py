"""Batched inner training (envs.batched): parity with TorchRun, isolation, and the SB3 vector env."""

import math
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

from controller.signals import PROBE_COORDS
from envs import ENV_ID, FAMILIES, EnvConfig, LRControlEnv, TaskConfig, TorchRun, get_family
from envs.batched import (
    BATCHABLE_FAMILIES,
    BatchConfig,
    BatchedMLPRun,
    BatchShape,
    ConcatVecEnv,
    LRControlVecEnv,
    is_batchable,
    make_vec_env,
)
from envs.tasks import OPTIMIZERS

EPOCHS = 3


def small_task(family: str, optimizer: str, seed: int = 0, *, depth: int | None = None, batch_size: int | None = None):
    """A quick task of ``family``: its narrowest width, two hidden layers where allowed, its largest batch."""
    fam = get_family(family)
    if depth is None:
        depth = 2 if 2 in fam.depths else max(fam.depths)
    return replace(fam.default_task(seed), optimizer=optimizer, lr=fam.default_lr(optimizer), width=min(fam.widths),
                   depth=depth, batch_size=batch_size or max(fam.batch_sizes))


def assert_same_result(batched, reference, *, context=""):
    """Losses to 1e-5 (relative); optimizer-hook signals to 1e-4 (a gradient norm is more sensitive to
    float32 rounding than a loss: the stacked update drifts to ~1e-5 of it within three epochs)."""
    approx = lambda x, rel=1e-5, abs=1e-7: pytest.approx(x, rel=rel, abs=abs, nan_ok=True)  # noqa: E731
    assert batched.train_loss == approx(reference.train_loss), context
    assert batched.val_loss == approx(reference.val_loss), context
    if reference.val_accuracy is None:
        assert batched.val_accuracy is None, context
    else:
        assert batched.val_accuracy == approx(reference.val_accuracy, abs=1e-6), context
    b, r = batched.stats, reference.stats
    assert b.steps == r.steps, context
    assert b.grad_norm_mean == approx(r.grad_norm_mean, rel=1e-4), context
    assert b.grad_norm_cv == approx(r.grad_norm_cv, rel=1e-4, abs=1e-6), context
    assert b.grad_norm_trend == approx(r.grad_norm_trend, rel=1e-4, abs=1e-4), context
    assert b.update_ratio == approx(r.update_ratio, rel=1e-4), context
    assert b.grad_cos == approx(r.grad_cos, rel=1e-4, abs=1e-4), context


def assert_same_evaluation(got, want):
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    assert (got[1] is None) == (want[1] is None)
    if want[1] is not None:
        assert got[1] == pytest.approx(want[1], abs=1e-6)


def run_both(tasks, epochs=EPOCHS, optimizer_impl="auto", lr_changes=None, device="cpu"):
    """Train ``tasks`` batched and one by one; compare every run's every epoch."""
    batch = BatchedMLPRun(tasks, device, optimizer_impl=optimizer_impl)
    refs = [TorchRun(t, device) for t in tasks]
    for (loss, acc), ref in zip(batch.evaluate(), refs):
        assert_same_evaluation((loss, acc), ref.evaluate())
    results = []
    for epoch in range(epochs):
        for i, factor in (lr_changes or {}).get(epoch, {}).items():
            batch.set_lr(i, batch.lrs[i] * factor)
            refs[i].set_lr(refs[i].lr * factor)
        got = batch.run_epoch()
        want = [ref.run_epoch() for ref in refs]
        for i in range(len(tasks)):
            assert_same_result(got[i], want[i], context=f"run {i} ({tasks[i].optimizer}), epoch {epoch}")
        results.append(got)
    return batch, refs, results


# ---- which families batch ----------------------------------------------------------------------


def test_batchable_families_are_exactly_the_mlp_families():
    assert set(BATCHABLE_FAMILIES) <= set(FAMILIES)
    for name in FAMILIES:
        task = small_task(name, "adam")
        if is_batchable(name):
            assert BatchedMLPRun([task]).n_runs == 1
        else:
            with pytest.raises(ValueError, match="not batchable"):
                BatchedMLPRun([task])
    assert {"digits_mlp", "friedman_mlp", "breast_cancer_mlp", "teacher_mlp", "mnist1d_mlp", "diabetes_mlp",
            "blobs_mlp", "mnist_mlp", "fashion_mnist_mlp", "kmnist_mlp", "cifar10_mlp"} == set(BATCHABLE_FAMILIES)
    with pytest.raises(ValueError, match="unknown task family 'digits_mpl'"):  # named, not silently unbatchable
        is_batchable("digits_mpl")


def test_runs_of_different_shapes_are_refused():
    a = small_task("digits_mlp", "sgd")
    with pytest.raises(ValueError, match="one shape"):
        BatchedMLPRun([a, replace(a, width=a.width * 2)])
    with pytest.raises(ValueError, match="one shape"):
        BatchedMLPRun([a, replace(a, batch_size=a.batch_size // 2)])
    batch = BatchedMLPRun([a])
    with pytest.raises(ValueError, match="cannot move runs"):
        batch.replace([0], BatchedMLPRun([replace(a, depth=1)]))
    with pytest.raises(ValueError, match="positive and finite"):
        batch.set_lr(0, math.nan)


# ---- parity with TorchRun ----------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("family", BATCHABLE_FAMILIES)
def test_batched_runs_match_torch_runs(family, optimizer):
    """Three runs (own seeds, LRs, later LR changes) batched vs one by one: same losses and signals."""
    base = small_task(family, optimizer)
    tasks = [replace(base, seed=seed, lr=base.lr * m) for seed, m in ((0, 1.0), (1, 3.0), (2, 0.3))]
    run_both(tasks, lr_changes={1: {0: 0.5, 2: 2.0}})


def test_large_models_probe_the_same_sketch_as_torch_runs():
    """Above PROBE_COORDS parameters both sides compare the same probe_coordinates blocks."""
    base = replace(small_task("digits_mlp", "adam"), width=256, depth=2)
    tasks = [replace(base, seed=seed, optimizer=o, lr=get_family("digits_mlp").default_lr(o))
             for seed, o in enumerate(("adam", "sgd"))]
    batch, _, _ = run_both(tasks, epochs=2)
    assert batch.params.shape[1] > PROBE_COORDS and batch._snapshots[0].shape[1] == PROBE_COORDS


def test_linear_model_matches_torch_run():
    tasks = [replace(small_task("breast_cancer_mlp", o, seed=i, depth=0)) for i, o in enumerate(OPTIMIZERS)]
    assert tasks[0].depth == 0
    run_both(tasks)


@pytest.mark.parametrize("optimizer_impl", ["fused", "stacked"])
@pytest.mark.parametrize("family", ["digits_mlp", "friedman_mlp"])
def test_mixed_optimizers_in_one_batch_match_torch_runs(family, optimizer_impl):
    """SGD, Adam and AdamW runs side by side, through both optimizer implementations."""
    tasks = [small_task(family, o, seed=i) for i, o in enumerate(OPTIMIZERS + OPTIMIZERS)]
    run_both(tasks, optimizer_impl=optimizer_impl, lr_changes={1: {1: 2.0, 3: 0.5}})


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_stacked_optimizer_matches_torch_runs(optimizer):
    base = small_task("blobs_mlp", optimizer)
    run_both([replace(base, seed=s) for s in range(3)], optimizer_impl="stacked")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optimizer_impl", ["stacked", "fused"])
@pytest.mark.parametrize("family", BATCHABLE_FAMILIES)
def test_batched_runs_match_torch_runs_on_cuda(family, optimizer_impl):
    """All runs resident on one GPU: SGD, Adam and AdamW side by side match TorchRun on the same GPU."""
    tasks = [replace(small_task(family, o, seed=i), lr=get_family(family).default_lr(o) * m)
             for i, (o, m) in enumerate(zip(OPTIMIZERS + OPTIMIZERS, (1.0, 3.0, 0.3, 0.5, 1.0, 2.0)))]
    batch, _, _ = run_both(tasks, optimizer_impl=optimizer_impl, lr_changes={1: {0: 2.0, 4: 0.5}}, device="cuda")
    assert batch.params.is_cuda and batch.optimizer_impl == optimizer_impl


@pytest.mark.parametrize("optimizer_impl", ["fused", "stacked"])
def test_replaced_run_matches_a_fresh_torch_run(optimizer_impl):
    """A slot given a new, untrained task mid-way trains like a fresh run, with its own sampling schedule.

    94 steps per epoch: a run past its first epoch samples every 2nd gradient norm and a probe pair
    every 23 steps, a fresh run every norm and a pair every 8 steps — both within one batch.
    """
    base = small_task("mnist1d_mlp", "adam", depth=1, batch_size=32)
    tasks = [replace(base, seed=s, optimizer=o) for s, o in enumerate(OPTIMIZERS)]
    batch = BatchedMLPRun(tasks, optimizer_impl=optimizer_impl)
    refs = [TorchRun(t) for t in tasks]
    batch.run_epoch()
    for ref in refs:
        ref.run_epoch()
    new_task = replace(base, seed=10, optimizer="adamw", lr=3e-3)  # fresh optimizer state and step count
    batch.replace([1], BatchedMLPRun([new_task], optimizer_impl=optimizer_impl))
    refs[1] = TorchRun(new_task)
    assert batch.configs[1] == new_task and batch.lrs[1] == 3e-3
    for epoch in range(2):
        got = batch.run_epoch()
        for i, ref in enumerate(refs):
            assert_same_result(got[i], ref.run_epoch(), context=f"run {i}, epoch {epoch}")
    assert got[0].stats.steps == 94


def test_evaluations_in_chunks_report_the_one_pass_loss_and_accuracy(monkeypatch):
    """Validation and test passes run in chunks of EVAL_CHUNK samples (a local family's 10 000 test images make
    three); bundled splits fit in one. With chunks of 97 samples, both runs still report the one-pass numbers."""
    import envs.batched
    import envs.inner

    tasks = [small_task("digits_mlp", o, seed=i) for i, o in enumerate(OPTIMIZERS)]
    batch, refs = BatchedMLPRun(tasks), [TorchRun(t) for t in tasks]
    batch.run_epoch()
    for ref in refs:
        ref.run_epoch()
    one_pass = {split: [ref.evaluate(split) for ref in refs] for split in ("val", "test")}
    assert len(get_family("digits_mlp").data().x_val) > 3 * 97  # several chunks, the last one partial
    monkeypatch.setattr(envs.inner, "EVAL_CHUNK", 97)
    monkeypatch.setattr(envs.batched, "EVAL_CHUNK", 97)
    for split, want in one_pass.items():
        for got in ([ref.evaluate(split) for ref in refs], batch.evaluate(split)):
            for g, w in zip(got, want, strict=True):
                assert_same_evaluation(g, w)


def test_one_diverging_run_leaves_the_others_untouched():
    """A run blown up to NaN by a huge LR: the other runs' numbers stay those of unbatched runs."""
    base = small_task("digits_mlp", "sgd")
    tasks = [replace(base, seed=0), replace(base, seed=1, lr=base.lr * 1e5), replace(base, seed=2, optimizer="adam",
                                                                                    lr=1e-3)]
    batch = BatchedMLPRun(tasks)
    refs = {i: TorchRun(tasks[i]) for i in (0, 2)}
    for epoch in range(EPOCHS):
        got = batch.run_epoch()
        for i, ref in refs.items():
            assert_same_result(got[i], ref.run_epoch(), context=f"run {i}, epoch {epoch}")
        assert not got[1].finite
    assert not math.isfinite(got[1].stats.grad_norm_mean)
    assert math.isfinite(got[0].stats.grad_norm_mean) and math.isfinite(got[2].stats.grad_norm_mean)


def test_slots_behave_as_inner_runs():
    tasks = [small_task("friedman_mlp", o, seed=i) for i, o in enumerate(OPTIMIZERS)]
    batch = BatchedMLPRun(tasks)
    slots = [batch.slot(i) for i in range(3)]
    refs = [TorchRun(t) for t in tasks]
    for slot, ref in zip(slots, refs):
        slot.set_lr(slot.lr * 2)
        ref.set_lr(ref.lr * 2)
    first = slots[0].run_epoch()
    with pytest.raises(RuntimeError, match="already trained"):
        slots[1].set_lr(1.0)
    with pytest.raises(RuntimeError, match="have not read"):
        slots[0].run_epoch()
    results = [first] + [s.run_epoch() for s in slots[1:]]
    for slot, result, ref in zip(slots, results, refs):
        assert_same_result(result, ref.run_epoch())
        assert_same_evaluation(slot.evaluate("test"), ref.evaluate("test"))
        assert slot.config == ref.config


# ---- the vector env ----------------------------------------------------------------------------


def shaped_tasks(family="breast_cancer_mlp"):
    """Three tasks of one shape, different optimizers, seeds and budgets."""
    base = small_task(family, "sgd", depth=1)
    return [replace(base, seed=1, epochs=6), replace(base, seed=2, optimizer="adam", lr=3e-3, epochs=3),
            replace(base, seed=3, optimizer="adamw", lr=1e-3, epochs=12)]


def reference_env(task, config):
    env = LRControlEnv(config)
    obs, info = env.reset(seed=0, options={"task": task})
    return env, obs, info


@pytest.mark.parametrize("reward, runs_per_batch", [("log_val", None), ("vs_cosine", None), ("log_val", 2)],
                         ids=["log_val", "vs_cosine", "two-batches"])
def test_vec_env_steps_like_separate_envs_and_auto_resets_at_the_budget(reward, runs_per_batch):
    """Same tasks and actions: the slots' observations, rewards and ends are LRControlEnv's."""
    config = EnvConfig(families=("breast_cancer_mlp",), reward=reward)
    tasks = shaped_tasks()
    venv = LRControlVecEnv(3, config, BatchConfig(runs_per_batch=runs_per_batch, reshape_every=None))
    venv.set_options([{"task": t} for t in tasks])
    venv.seed(0)
    obs = venv.reset()
    refs = [reference_env(t, config) for t in tasks]
    for i, (_, ref_obs, ref_info) in enumerate(refs):
        np.testing.assert_allclose(obs[i], ref_obs, atol=1e-4)
        assert venv.reset_infos[i]["lr"] == ref_info["lr"]
    # the untrained model's validation loss, the reference a later blow-up is measured against
    initial = [episode.initial_val for episode in venv.get_attr("episode")]
    assert initial == pytest.approx([env.episode.initial_val for env, _, _ in refs], rel=1e-5)
    rng = np.random.default_rng(0)
    for step in range(1, 4):
        actions = rng.uniform(-1, 1, size=(3, 1)).astype(np.float32)
        obs, rewards, dones, infos = venv.step(actions)
        for i, (env, _, _) in enumerate(refs):
            if step > tasks[i].epochs - 1:
                continue
            ref_obs, ref_reward, term, trunc, ref_info = env.step(actions[i])
            assert dones[i] == (term or trunc)
            assert rewards[i] == pytest.approx(ref_reward, abs=1e-5)
            assert infos[i]["lr"] == pytest.approx(ref_info["lr"], rel=1e-12)
            assert infos[i]["TimeLimit.truncated"] == (trunc and not term)
            if dones[i]:
                np.testing.assert_allclose(infos[i]["terminal_observation"], ref_obs, atol=1e-4)
                # The returned observation starts the next episode, a fresh task of the batch's shape.
                new_task = venv.get_attr("episode", i)[0].task
                assert new_task != tasks[i] and BatchShape.of(new_task) == BatchShape.of(tasks[i])
                assert infos[i]["epoch"] == tasks[i].epochs and venv.reset_infos[i]["epoch"] == 1
                assert not np.allclose(obs[i], ref_obs)
            else:
                np.testing.assert_allclose(obs[i], ref_obs, atol=1e-4)
                assert "terminal_observation" not in infos[i]
    assert dones.tolist() == [False, False, False] and venv.get_attr("episode", 1)[0].epoch == 2
    for got, (env, _, _) in zip(venv.env_method("test_loss", indices=[0, 2]), (refs[0], refs[2])):
        assert_same_evaluation(got, env.test_loss())  # the test split, as LRControlEnv reads it


def test_forced_divergence_ends_one_slot_and_leaves_the_others_alone():
    config = EnvConfig(families=("digits_mlp",), divergence_penalty=3.0)
    base = small_task("digits_mlp", "sgd", depth=1)
    tasks = [replace(base, seed=1), replace(base, seed=2, lr=base.lr * 1e4), replace(base, seed=3, optimizer="adam",
                                                                                     lr=1e-3)]
    venv = LRControlVecEnv(3, config)
    venv.set_options([{"task": t} for t in tasks])
    obs = venv.reset()
    refs = [reference_env(t, config) for t in tasks]
    returns, done_at = 0.0, None
    for step in range(1, 6):
        actions = np.array([[0.0], [1.0], [0.0]], dtype=np.float32)  # push the x1e4 LR further up
        obs, rewards, dones, infos = venv.step(actions)
        for i in (0, 2):
            ref_obs, ref_reward, *_ = refs[i][0].step(actions[i])
            assert not dones[i]
            np.testing.assert_allclose(obs[i], ref_obs, atol=1e-4)
            assert rewards[i] == pytest.approx(ref_reward, abs=1e-5)
        if done_at is None:
            ref_obs, ref_reward, term, trunc, _ = refs[1][0].step(actions[1])
            returns += rewards[1]
            assert rewards[1] == pytest.approx(ref_reward, abs=1e-5)
            if dones[1]:
                done_at = step
                assert term and infos[1]["diverged"] and not infos[1]["TimeLimit.truncated"]
                np.testing.assert_allclose(infos[1]["terminal_observation"], ref_obs, atol=1e-4)
                assert np.isfinite(obs[1]).all() and venv.reset_infos[1]["epoch"] == 1
                assert venv.get_attr("episode", 1)[0].task != tasks[1]
        assert np.isfinite(obs).all() and np.isfinite(rewards).all()
    assert done_at is not None, "a x1e4 SGD LR must diverge within 5 epochs"
    assert returns == pytest.approx(-3.0)


def test_a_slot_diverging_on_a_reshape_step_is_terminated_not_truncated():
    """The step where a slot diverges is also its batch's reshape: that slot ends terminated with its penalty, the
    others truncated, and every slot starts a new task."""
    config = EnvConfig(families=("digits_mlp",), divergence_penalty=3.0)
    # AdamW at 30x its family's LR survives its first epoch, then diverges under the agent's rises (step 10)
    hot = TaskConfig(family="digits_mlp", seed=1367864806, optimizer="adamw", lr=0.03, epochs=19, batch_size=32,
                     width=32, depth=1)
    tasks = [replace(hot, seed=1, lr=1e-3), hot, replace(hot, seed=2, lr=1e-3)]
    actions = np.array([[0.0], [1.0], [0.0]], dtype=np.float32)

    def started(reshape_every):
        venv = LRControlVecEnv(3, config, BatchConfig(reshape_every=reshape_every))
        venv.set_options([{"task": t} for t in tasks])
        venv.reset()
        return venv

    venv = started(None)  # when does slot 1 diverge on its own?
    diverged_at = next(step for step in range(1, 19) if venv.step(actions)[2][1])
    assert diverged_at > 1, "the slot must diverge mid-episode, not in its first epoch"
    venv = started(diverged_at)
    returns = np.zeros(3)
    for step in range(1, diverged_at + 1):
        _, rewards, dones, infos = venv.step(actions)
        returns += rewards
        assert dones.all() == (step == diverged_at)
    assert infos[1]["diverged"] and not infos[1]["TimeLimit.truncated"]
    assert returns[1] == pytest.approx(-3.0)
    for s in (0, 2):
        assert not infos[s]["diverged"] and infos[s]["TimeLimit.truncated"] and np.isfinite(returns[s])
    assert all("terminal_observation" in info for info in infos)
    after = venv.get_attr("episode")
    assert all(e.task != t and e.epoch == 1 for e, t in zip(after, tasks))
    obs, rewards, dones, _ = venv.step(np.zeros((3, 1), dtype=np.float32))  # and the new batch trains on
    assert np.isfinite(obs).all() and np.isfinite(rewards).all()


def test_reshape_truncates_every_slot_and_draws_new_tasks():
    config = EnvConfig(families=("breast_cancer_mlp", "diabetes_mlp"))
    venv = LRControlVecEnv(4, config, BatchConfig(runs_per_batch=2, reshape_every=4))
    venv.seed(3)
    venv.reset()
    before = [e.task for e in venv.get_attr("episode")]
    assert {BatchShape.of(t) for t in before[:2]} == {BatchShape.of(before[0])}
    # Staggered: the first batch reshapes after 4 epochs, the second after 2 (then 6).
    ends = {0: [], 1: []}
    for step in range(1, 5):
        _, _, dones, infos = venv.step(np.zeros((4, 1), dtype=np.float32))
        for group, slots in ((0, (0, 1)), (1, (2, 3))):
            if all(dones[s] for s in slots):
                ends[group].append(step)
                for s in slots:
                    assert infos[s]["TimeLimit.truncated"] == (not infos[s]["diverged"])
                    assert "terminal_observation" in infos[s]
    assert ends == {0: [4], 1: [2]}
    after = [e.task for e in venv.get_attr("episode")]
    assert all(a != b for a, b in zip(after, before))
    assert BatchShape.of(after[0]) == BatchShape.of(after[1])


def test_seeded_reset_is_reproducible():
    config = EnvConfig(families=("breast_cancer_mlp", "diabetes_mlp"))

    def rollout(seed):
        venv = LRControlVecEnv(3, config)
        venv.seed(seed)
        out = [venv.reset()]
        out += [venv.step(np.full((3, 1), 0.5, dtype=np.float32))[0] for _ in range(2)]
        return out, [e.task for e in venv.get_attr("episode")]

    (a, tasks_a), (b, tasks_b), (_, tasks_c) = rollout(5), rollout(5), rollout(6)
    assert tasks_a == tasks_b and tasks_a != tasks_c
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_vec_env_draws_tasks_as_reset_options_and_the_epoch_range_say():
    fam = get_family("diabetes_mlp")  # in no family list of the config: only the reset option can draw it
    config = EnvConfig(families=("digits_mlp", "friedman_mlp", "breast_cancer_mlp", "teacher_mlp"), epochs=(3, 3))
    venv = LRControlVecEnv(3, config, BatchConfig(reshape_every=None))
    venv.seed(0)
    venv.set_options({"family": "diabetes_mlp", "lr_multiplier": 10.0})
    venv.reset()
    tasks = [episode.task for episode in venv.get_attr("episode")]
    assert [t.family for t in tasks] == ["diabetes_mlp"] * 3 and [t.epochs for t in tasks] == [3] * 3
    assert [t.lr for t in tasks] == pytest.approx([10.0 * fam.default_lr(t.optimizer) for t in tasks], rel=1e-12)
    for _ in range(2):  # the 3-epoch budget ends every episode: the slots' next tasks keep the range
        venv.step(np.zeros(3, dtype=np.float32))
    fresh = [episode.task for episode in venv.get_attr("episode")]
    assert all(t not in tasks for t in fresh) and [t.epochs for t in fresh] == [3] * 3


def test_vec_env_api_and_refusals():
    assert LRControlVecEnv(1).config.families == ("digits_mlp", "friedman_mlp", "breast_cancer_mlp", "teacher_mlp")
    # the family's default LR and a seed: a task drawn at a random LR can diverge in its first epoch (a NaN
    # test loss), which made this check fail now and then
    config = EnvConfig(families=("diabetes_mlp",), lr_multiplier=1.0)
    venv = LRControlVecEnv(2, config)
    with pytest.raises(RuntimeError, match="reset"):
        venv.step(np.zeros((2, 1), dtype=np.float32))
    venv.seed(0)
    venv.reset()
    assert venv.get_attr("render_mode") == [None, None]
    assert venv.get_attr("config", [1]) == [config]
    assert venv.get_attr("spec") == [gym.make(ENV_ID, config=config).spec] * 2  # as a DummyVecEnv's slots answer
    losses = venv.env_method("test_loss")
    assert len(losses) == 2 and all(math.isfinite(loss) and acc is None for loss, acc in losses)
    assert venv.env_is_wrapped(VecMonitor) == [False, False]
    with pytest.raises(ValueError, match=r"one action a in \[-1, 1\] per slot \(2\), got shape \(2, 2\)"):
        venv.step(np.zeros((2, 2), dtype=np.float32))  # not its first column, silently
    venv.step(np.zeros(2, dtype=np.float32))  # a flat vector is one action per slot too
    with pytest.raises(ValueError, match="all slots at once"):
        venv.set_attr("config", config, indices=[0])
    with pytest.raises(ValueError, match="not batchable"):
        LRControlVecEnv(2, EnvConfig(families=("diabetes_mlp", "mnist1d_cnn")))
    venv.set_options([{"family": "diabetes_mlp"}, {"family": "friedman_mlp"}])
    with pytest.raises(ValueError, match="share a family"):
        venv.reset()
    venv.set_options({"famliy": "diabetes_mlp"})
    with pytest.raises(ValueError, match="unknown reset options"):
        venv.reset()
    venv.set_options({"task": small_task("diabetes_mlp", "sgd"), "lr_multiplier": 10.0})  # as LRControlEnv: refused
    with pytest.raises(ValueError, match=r"'task' fixes the whole task: \['lr_multiplier'\] would be ignored"):
        venv.reset()
    with pytest.raises(ValueError, match="runs_per_batch"):
        BatchConfig(runs_per_batch=0)


def test_make_vec_env_batches_what_it_can():
    config = EnvConfig()
    one = make_vec_env("digits_mlp", 2, config, seed=0, monitor=False)  # one family by name, not its letters
    assert one.get_attr("config")[0].families == ("digits_mlp",)
    batched = make_vec_env(("digits_mlp", "teacher_mlp"), 4, config, seed=0)
    assert isinstance(batched, VecMonitor) and isinstance(batched.unwrapped, LRControlVecEnv)
    plain = make_vec_env(("mnist1d_cnn",), 2, config, seed=0, monitor=False)
    assert isinstance(plain, DummyVecEnv)
    mixed = make_vec_env(("digits_mlp", "friedman_mlp", "breast_cancer_mlp", "mnist1d_gru"), 4, config, seed=0)
    inner = mixed.unwrapped
    assert isinstance(inner, ConcatVecEnv) and [v.num_envs for v in inner.venvs] == [3, 1]
    obs = mixed.reset()
    assert obs.shape == (4, 19)
    families = [e.task.family for e in mixed.get_attr("episode")]
    assert is_batchable(families[0]) and families[3] == "mnist1d_gru"
    obs, rewards, dones, infos = mixed.step(np.zeros((4, 1), dtype=np.float32))
    assert obs.shape == (4, 19) and np.isfinite(rewards).all() and len(infos) == 4
    assert all("TimeLimit.truncated" in info for info in infos)
    both = mixed.env_method("test_loss", indices=[3, 0])
    assert both == [mixed.env_method("test_loss", indices=[3])[0], mixed.env_method("test_loss", indices=[0])[0]]
    assert both[0][1] is not None and math.isfinite(both[1][0])


def test_concatenated_vec_envs_seed_their_slots_as_one_vec_env_would():
    config = EnvConfig(families=("breast_cancer_mlp", "diabetes_mlp"))
    make = lambda n: DummyVecEnv([lambda: LRControlEnv(config)] * n)  # noqa: E731
    one, halves = make(4), ConcatVecEnv([make(2), make(2)])
    for venv in (one, halves):
        venv.seed(5)
        venv.reset()
    tasks = [episode.task for episode in one.get_attr("episode")]
    assert len(set(tasks)) == 4 and [episode.task for episode in halves.get_attr("episode")] == tasks


def test_ppo_learns_on_the_batched_vec_env():
    """A few hundred PPO steps: rollouts cross episode ends and reshapes, episodes get logged."""
    venv = make_vec_env(("breast_cancer_mlp", "diabetes_mlp"), 4, EnvConfig(), seed=0,
                        batch_config=BatchConfig(runs_per_batch=2, reshape_every=48))
    model = PPO("MlpPolicy", venv, n_steps=32, batch_size=64, n_epochs=2, policy_kwargs={"net_arch": [16]},
                seed=0, device="cpu")
    model.learn(total_timesteps=384)
    assert model.num_timesteps >= 384
    episodes = list(model.ep_info_buffer)
    assert len(episodes) >= 4
    assert all(1 <= ep["l"] <= 39 and math.isfinite(ep["r"]) for ep in episodes)
    assert np.isfinite(model.rollout_buffer.values).all() and np.isfinite(model.rollout_buffer.returns).all()
