"""PolicyScheduler inside PyTorch Lightning and Hugging Face Trainer, with the real libraries.

Each trainer test records the LR every optimizer step saw (an optimizer step pre-hook), then checks
that it changed exactly at the decisions and nowhere else, and that a run resumed from the trainer's
own checkpoint continues the uninterrupted run's LR sequence exactly. The policy is a small random
net (seeded) whose every decision moves the LR, which the bundled policy need not do on these tasks.
"""

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from controller import PolicyNet, PolicyScheduler, save_policy
from controller.features import FEATURE_NAMES, N_FEATURES

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------
# Shared pieces

no_training = pytest.mark.filterwarnings("ignore:PolicyScheduler decision .* follows no optimizer step:RuntimeWarning")
"""For the tests that make decisions without training, on purpose: the scheduler warns that no optimizer step came
before them."""


@pytest.fixture
def policy_path(tmp_path):
    """A seeded random policy whose actions are negative and never 0, so every decision changes the LR
    (a rise could be held back by the safety rule when the validation loss is above its best)."""
    torch.manual_seed(1234)
    net = PolicyNet(N_FEATURES, hidden=(16,))
    with torch.no_grad():
        net.action_net.bias.fill_(-0.6)
    return save_policy(tmp_path / "random_policy.safetensors", net)


def _regression_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    w = torch.randn(6, 1, generator=g)
    return x, x @ w + 0.1 * torch.randn(n, 1, generator=g)


def _record_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The LR each optimizer step runs with, in order."""
    lrs: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(float(opt.param_groups[0]["lr"])))
    return lrs


def _assert_changes_exactly_at(lrs: list[float], boundaries: list[int], history: list[dict]) -> None:
    """The LR is constant between decisions, changes at every decision, and equals what history says."""
    changes = [i for i in range(1, len(lrs)) if lrs[i] != lrs[i - 1]]
    assert changes == boundaries, f"LR changed at steps {changes}, decisions were before steps {boundaries}"
    assert [lrs[i] for i in boundaries] == [h["lr"] for h in history[: len(boundaries)]]


# ---------------------------------------------------------------------------------------------------
# The scheduler API the integrations use (no trainer library needed)


def _sgd(seed: int = 0) -> torch.optim.Optimizer:
    torch.manual_seed(seed)
    return torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=0.05)


@no_training
def test_deferred_total_epochs_refuses_to_decide_until_set(policy_path):
    deferred = PolicyScheduler(_sgd(), total_epochs=None, policy=policy_path)
    explicit = PolicyScheduler(_sgd(), total_epochs=5, policy=policy_path)
    with pytest.warns(RuntimeWarning, match="add its callback"):  # no budget yet: a trainer without its callback?
        deferred.step()  # what HF calls after every optimizer step: allowed, no decision
    with pytest.raises(RuntimeError, match="set_total_epochs"):
        deferred.step(1.0, train_loss=1.2)
    assert deferred.history == [] and deferred.last_epoch == 0
    deferred.set_total_epochs(5)
    for val in (1.0, 0.9, 0.85):
        deferred.step(val, train_loss=val + 0.1)
        explicit.step(val, train_loss=val + 0.1)
    assert deferred.history == explicit.history
    assert deferred.history[0]["obs"][0] == pytest.approx(1 / 5)  # progress uses the total set later
    with pytest.raises(ValueError, match="positive int"):
        deferred.set_total_epochs(0)
    with pytest.raises(ValueError, match="positive int"):
        PolicyScheduler(_sgd(), total_epochs=0)


@no_training
def test_observed_train_losses_reach_the_next_decision_as_a_weighted_mean(policy_path):
    fed = PolicyScheduler(_sgd(), total_epochs=4, policy=policy_path)
    given = PolicyScheduler(_sgd(), total_epochs=4, policy=policy_path)
    fed.observe_train_loss(torch.tensor(0.8), weight=3)
    fed.observe_train_loss(0.4, weight=1)
    assert fed.pending_train_loss == pytest.approx(0.7)
    with pytest.warns(RuntimeWarning, match="no metric"):  # no decision yet and no trainer callback: said once
        fed.step()  # a step without a metric keeps the record
    fed.step(0.9)
    given.step(0.9, train_loss=0.7)
    assert fed.history[0]["train_loss"] == pytest.approx(0.7)
    assert fed.history[0]["obs"] == pytest.approx(given.history[0]["obs"])
    assert fed.pending_train_loss is None  # used once, then forgotten
    fed.step(0.8)
    assert fed.history[1]["train_loss"] is None
    fed.observe_train_loss(5.0)
    fed.step(0.7, train_loss=0.6)  # an explicit train_loss wins and the record is dropped
    assert fed.history[2]["train_loss"] == 0.6 and fed.pending_train_loss is None
    with pytest.raises(ValueError, match="weight"):
        fed.observe_train_loss(1.0, weight=0)


@no_training
def test_state_with_deferred_total_and_pending_loss_reloads_with_weights_only(policy_path, tmp_path):
    a = PolicyScheduler(_sgd(), total_epochs=None, policy=policy_path)
    a.observe_train_loss(1.5, weight=2)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = PolicyScheduler(_sgd(), total_epochs=None, policy=policy_path)
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert b.pending_train_loss == 1.5 and b.total_epochs is None
    for s in (a, b):
        s.set_total_epochs(3)
        s.step(1.0)
    assert a.history == b.history and a.get_last_lr() == b.get_last_lr()


@no_training
def test_state_saved_before_pending_losses_existed_still_loads(policy_path):
    a = PolicyScheduler(_sgd(), total_epochs=3, policy=policy_path)
    a.step(1.0, train_loss=1.1)
    old = {k: v for k, v in a.state_dict().items() if not k.startswith("_pending")}
    b = PolicyScheduler(_sgd(), total_epochs=3, policy=policy_path)
    b.observe_train_loss(9.0)
    b.load_state_dict(old)
    assert b.pending_train_loss is None and b.history == a.history


# ---------------------------------------------------------------------------------------------------
# PyTorch Lightning

LIGHTNING_MISSING = "pytorch_lightning is not installed: pip install 'lrcontrol[lightning]'"
LIGHTNING_STEPS_PER_EPOCH = 4  # 64 samples, batches of 16


def _lightning_run(tmp_path, policy_path, *, max_epochs, total_epochs=None, ckpt_path=None, callbacks=(),
                   scheduler_config=None, with_callback=True, unsized=False, package="pytorch_lightning",
                   **trainer_kwargs):
    """Fit a tiny regression MLP; returns (per-step LRs, scheduler, module).

    ``unsized``: the train loader iterates an IterableDataset, so it has no length. ``package``: the Lightning the
    module and Trainer come from, ``"pytorch_lightning"`` or ``"lightning.pytorch"`` (``import lightning as L``)."""
    pl = pytest.importorskip(package, reason=LIGHTNING_MISSING)
    from torch.utils.data import DataLoader, TensorDataset

    from controller.integrations.lightning import PolicySchedulerCallback, lr_scheduler_config

    class Regressor(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
            self.lrs: list[float] = []
            self.batch_losses: list[tuple[float, int]] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.batch_losses.append((loss.item(), len(x)))
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
            self.lrs = _record_lrs(optimizer)
            self.scheduler = PolicyScheduler(optimizer, total_epochs=total_epochs, policy=policy_path)
            config = scheduler_config(self.scheduler) if scheduler_config else lr_scheduler_config(self.scheduler)
            return {"optimizer": optimizer, "lr_scheduler": config}

    x, y = _regression_data(96, seed=1)
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16)  # fixed order: resumable exactly
    if unsized:
        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self):
                return zip(x[:64], y[:64])

        train = DataLoader(Stream(), batch_size=16)
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=32)
    model = Regressor()
    trainer = pl.Trainer(
        max_epochs=max_epochs, callbacks=[*callbacks, *[PolicySchedulerCallback()] * with_callback],
        default_root_dir=tmp_path,
        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
        **trainer_kwargs,
    )
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return model.lrs, model.scheduler, model


LIGHTNING_PACKAGES = pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])


@LIGHTNING_PACKAGES
def test_lightning_decides_once_per_epoch_from_val_and_train_loss(tmp_path, policy_path, package):
    lrs, scheduler, model = _lightning_run(tmp_path, policy_path, max_epochs=4, package=package)
    assert scheduler.total_epochs == 4  # deferred: filled in from max_epochs
    assert [h["epoch"] for h in scheduler.history] == [1, 2, 3, 4]
    assert len(lrs) == 4 * LIGHTNING_STEPS_PER_EPOCH
    _assert_changes_exactly_at(lrs, [4, 8, 12], scheduler.history)
    assert scheduler.get_last_lr()[0] == scheduler.history[-1]["lr"] != lrs[-1]  # the last decision, too
    # the training loss reached the scheduler without user code: the per-sample mean of each epoch
    for epoch, h in enumerate(scheduler.history):
        batches = model.batch_losses[epoch * 4 : (epoch + 1) * 4]
        mean = sum(loss * n for loss, n in batches) / sum(n for _, n in batches)
        assert h["train_loss"] == pytest.approx(mean, rel=1e-6)
        assert h["val_loss"] > 0 and h["action"] is not None and len(h["obs"]) == N_FEATURES


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the resumed run checkpoints elsewhere: fine
@pytest.mark.parametrize("save_on_train_epoch_end", [None, False], ids=["ckpt-at-train-epoch-end", "ckpt-at-val-end"])
@LIGHTNING_PACKAGES
def test_lightning_resume_continues_the_exact_lr_sequence(tmp_path, policy_path, save_on_train_epoch_end, package):
    ModelCheckpoint = pytest.importorskip(f"{package}.callbacks", reason=LIGHTNING_MISSING).ModelCheckpoint

    full_lrs, full, _ = _lightning_run(tmp_path / "full", policy_path, max_epochs=4, total_epochs=4, package=package)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_on_train_epoch_end=save_on_train_epoch_end)
    with pytest.warns(RuntimeWarning, match="plans 2 epochs"):  # stopped half-way on purpose
        first_lrs, first, _ = _lightning_run(tmp_path / "a", policy_path, max_epochs=2, total_epochs=4,
                                             callbacks=[ckpt], package=package)
    # Lightning saved before its scheduler step of epoch 2 and skips that step when it resumes: the
    # callback must make that decision, or everything after it is off by one decision.
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["lr_schedulers"][0]["last_epoch"] == 1
    rest_lrs, resumed, _ = _lightning_run(tmp_path / "b", policy_path, max_epochs=4, total_epochs=4,
                                          ckpt_path=tmp_path / "ckpt" / "last.ckpt", package=package)
    _assert_changes_exactly_at(full_lrs, [4, 8, 12], full.history)
    assert first_lrs + rest_lrs == full_lrs
    assert resumed.history == full.history
    assert resumed.get_last_lr() == full.get_last_lr()


@pytest.mark.filterwarnings("ignore:The dirpath has changed", "ignore:Be aware that when using `ckpt_path`")
def test_lightning_resume_from_an_epochs_last_batch_keeps_epochs_apart_and_warns(tmp_path, policy_path):
    """A checkpoint saved at an epoch's last batch comes before that epoch's validation, which Lightning skips
    on restart: that decision is lost (warned), but the next epoch's loss, optimizer steps and progress must
    be its own, not mixed with the unvalidated epoch's."""
    pytest.importorskip("pytorch_lightning", reason=LIGHTNING_MISSING)
    from pytorch_lightning.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=LIGHTNING_STEPS_PER_EPOCH, save_top_k=-1)
    with pytest.warns(RuntimeWarning, match="plans 1 epochs"):
        _lightning_run(tmp_path / "a", policy_path, max_epochs=1, total_epochs=3, callbacks=[ckpt])
    last_batch = tmp_path / "ckpt" / f"epoch=0-step={LIGHTNING_STEPS_PER_EPOCH}.ckpt"
    with pytest.warns(RuntimeWarning, match="after epoch 0's last training batch and before its validation"):
        lrs, resumed, model = _lightning_run(tmp_path / "b", policy_path, max_epochs=3, total_epochs=3,
                                             ckpt_path=last_batch)
    assert len(lrs) == 2 * LIGHTNING_STEPS_PER_EPOCH
    assert [h["epoch"] for h in resumed.history] == [2, 3]  # epoch 1's decision is lost, its count is not
    assert [h["obs"][FEATURE_NAMES.index("progress")] for h in resumed.history] == pytest.approx([2 / 3, 1.0])
    steps = FEATURE_NAMES.index("log10_steps")
    for epoch, h in enumerate(resumed.history):
        batches = model.batch_losses[epoch * 4 : (epoch + 1) * 4]
        assert h["train_loss"] == pytest.approx(sum(loss * n for loss, n in batches) / 64, rel=1e-6)
        assert h["obs"][steps] == pytest.approx(np.log10(LIGHTNING_STEPS_PER_EPOCH) / 2)


def test_lightning_callback_reused_after_an_interrupted_fit_starts_the_next_fit_afresh(tmp_path, policy_path):
    """A fit interrupted mid-epoch left that epoch's loss sum in the callback; the next fit with the same callback
    took it for a checkpoint saved before validation: a false warning, and every decision one epoch late."""
    pl = pytest.importorskip("pytorch_lightning", reason=LIGHTNING_MISSING)
    from controller.integrations.lightning import PolicySchedulerCallback

    class Interrupt(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2 * LIGHTNING_STEPS_PER_EPOCH + 2:
                raise RuntimeError("interrupted")

    callback = PolicySchedulerCallback()
    with pytest.raises(RuntimeError, match="interrupted"):
        _lightning_run(tmp_path / "a", policy_path, max_epochs=4, callbacks=[Interrupt(), callback],
                       with_callback=False)
    assert len(callback.scheduler.history) == 2 and callback._loss_sum is not None  # mid-epoch 3
    fresh_lrs, fresh, _ = _lightning_run(tmp_path / "b", policy_path, max_epochs=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="resumed from a checkpoint")
        lrs, reused, _ = _lightning_run(tmp_path / "c", policy_path, max_epochs=4, callbacks=[callback],
                                        with_callback=False)
    assert [h["epoch"] for h in reused.history] == [1, 2, 3, 4]
    assert lrs == fresh_lrs and reused.history == fresh.history


def test_lightning_without_its_callback_warns_that_decisions_lack_the_train_loss(tmp_path, policy_path):
    with pytest.warns(RuntimeWarning, match="callback never attached.*PolicySchedulerCallback"):
        _, scheduler, _ = _lightning_run(tmp_path, policy_path, max_epochs=2, total_epochs=2, with_callback=False)
    assert [h["train_loss"] for h in scheduler.history] == [None, None]


@pytest.mark.parametrize(
    "config, message",
    [
        (lambda s: {"scheduler": s, "interval": "epoch"}, "reduce_on_plateau=False"),
        (lambda s: {"scheduler": s, "interval": "step", "reduce_on_plateau": True, "monitor": "val_loss"}, "interval"),
    ],
    ids=["no-plateau-flag", "step-interval"],
)
def test_lightning_refuses_configs_that_would_never_pass_the_val_loss(tmp_path, policy_path, config, message):
    with pytest.raises(ValueError, match=message):
        _lightning_run(tmp_path, policy_path, max_epochs=1, scheduler_config=config)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"max_epochs": 2, "check_val_every_n_epoch": 2}, "validate every epoch"),
     ({"max_epochs": -1, "max_steps": -1}, "takes its budget from Trainer\\(max_epochs=...\\) or max_steps, which "
      "are -1 and -1"),
     ({"max_epochs": 2, "limit_val_batches": 0}, "this run never validates"),
     ({"max_epochs": -1, "max_steps": 8, "unsized": True},
      r"Trainer\(max_steps=8\) here, but the train dataloader has no length .* total_epochs=N")],
    ids=["validation-every-2-epochs", "no-epoch-budget", "no-validation", "max-steps-over-an-unsized-loader"],
)
def test_lightning_refuses_trainers_it_cannot_decide_under(tmp_path, policy_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _lightning_run(tmp_path, policy_path, **kwargs)


def test_lightning_plans_the_epochs_max_steps_leaves(tmp_path, policy_path):
    """4 optimizer steps an epoch: max_steps=8 ends the run after 2 of max_epochs=10, and progress must say so."""
    _, scheduler, _ = _lightning_run(tmp_path, policy_path, max_epochs=10, max_steps=8)
    assert scheduler.total_epochs == 2 and len(scheduler.history) == 2
    assert [h["obs"][FEATURE_NAMES.index("progress")] for h in scheduler.history] == [0.5, 1.0]
    with pytest.warns(RuntimeWarning, match=r"total_epochs=10\) but the Trainer plans 2 epochs"):
        _lightning_run(tmp_path / "explicit", policy_path, max_epochs=10, max_steps=8, total_epochs=10)


def test_lightning_does_not_plan_the_epoch_max_steps_cuts_short(tmp_path, policy_path):
    """max_steps=10 stops in the third epoch, which Lightning does not validate: two decisions, and the last must
    see progress 1, as at the end of the run."""
    lrs, scheduler, _ = _lightning_run(tmp_path, policy_path, max_epochs=10, max_steps=10)
    assert len(lrs) == 10 and len(scheduler.history) == 2 and scheduler.total_epochs == 2
    assert [h["obs"][FEATURE_NAMES.index("progress")] for h in scheduler.history] == [0.5, 1.0]


def test_lightning_with_gradient_accumulation_reads_each_batchs_own_loss(tmp_path, policy_path):
    """accumulate_grad_batches=2: two optimizer steps an epoch, and Lightning hands the callback each batch loss
    divided by 2, which must be undone; max_steps counts optimizer steps, not batches."""
    lrs, scheduler, model = _lightning_run(tmp_path, policy_path, max_epochs=3, accumulate_grad_batches=2)
    assert len(lrs) == 3 * 2
    _assert_changes_exactly_at(lrs, [2, 4], scheduler.history)
    steps = FEATURE_NAMES.index("log10_steps")
    for epoch, h in enumerate(scheduler.history):
        batches = model.batch_losses[epoch * 4 : (epoch + 1) * 4]
        assert h["train_loss"] == pytest.approx(sum(loss * n for loss, n in batches) / 64, rel=1e-6)
        assert h["obs"][steps] == pytest.approx(np.log10(2) / 2)  # the hook counted optimizer steps
    _, planned, _ = _lightning_run(tmp_path / "max-steps", policy_path, max_epochs=10, max_steps=4,
                                   accumulate_grad_batches=2)
    assert planned.total_epochs == 2 and len(planned.history) == 2


@LIGHTNING_PACKAGES
def test_lightning_refuses_a_module_without_validation_step(tmp_path, policy_path, package):
    pl = pytest.importorskip(package, reason=LIGHTNING_MISSING)
    from controller.integrations.lightning import PolicySchedulerCallback, lr_scheduler_config

    class NoValidation(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(6, 1)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.05)
            scheduler = PolicyScheduler(optimizer, total_epochs=None, policy=policy_path)
            return {"optimizer": optimizer, "lr_scheduler": lr_scheduler_config(scheduler)}

    x, y = _regression_data(32, seed=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer = pl.Trainer(max_epochs=1, callbacks=[PolicySchedulerCallback()], default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    with pytest.raises(ValueError, match="this run never validates"):
        trainer.fit(NoValidation(), loader, loader)
    # a validation_step inherited from a class of Lightning's own package (not LightningModule) counts
    from controller.integrations.lightning import _overrides

    BoringModel = pytest.importorskip(f"{package}.demos.boring_classes").BoringModel
    assert _overrides(BoringModel(), "validation_step") and not _overrides(NoValidation(), "validation_step")


def test_lightning_scheduler_config_checks_its_arguments(policy_path):
    pytest.importorskip("pytorch_lightning", reason=LIGHTNING_MISSING)
    from controller.integrations.lightning import lr_scheduler_config

    optimizer = _sgd()
    with pytest.raises(TypeError, match="expected a PolicyScheduler, got StepLR"):
        lr_scheduler_config(torch.optim.lr_scheduler.StepLR(optimizer, 1))
    with pytest.raises(ValueError, match="monitor must be the logged name"):
        lr_scheduler_config(PolicyScheduler(optimizer, total_epochs=3, policy=policy_path), monitor="")


# ---------------------------------------------------------------------------------------------------
# Hugging Face Trainer

HF_MISSING = "transformers/accelerate are not installed: pip install 'lrcontrol[hf]'"
HF_STEPS_PER_EPOCH = 4  # 64 samples, batches of 16


class _PairDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class _TinyRegressor(torch.nn.Module):
    """What the Trainer needs from a model: forward(**batch) -> {"loss", "logits"}."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": None if labels is None else torch.nn.functional.mse_loss(out, labels), "logits": out}


def _hf_trainer(tmp_path, policy_path, *, total_epochs=None, callbacks=(), callback_kwargs=None,
                compute_metrics=None, scheduler=None, **overrides):
    """A Trainer on a tiny regression MLP; returns (trainer, per-step LRs, scheduler).

    ``scheduler``: a function of the optimizer that replaces the PolicyScheduler."""
    transformers = pytest.importorskip("transformers", reason=HF_MISSING)
    pytest.importorskip("accelerate", reason=HF_MISSING)
    from controller.integrations.hf import PolicySchedulerCallback

    x, y = _regression_data(96, seed=1)
    model = _TinyRegressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lrs = _record_lrs(optimizer)
    scheduler = (PolicyScheduler(optimizer, total_epochs=total_epochs, policy=policy_path) if scheduler is None
                 else scheduler(optimizer))
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=16, per_device_eval_batch_size=32,
        num_train_epochs=4, eval_strategy="epoch", logging_strategy="epoch", save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    settings.update(overrides)
    trainer = transformers.Trainer(
        model=model, args=transformers.TrainingArguments(**settings),
        train_dataset=_PairDataset(x[:64], y[:64]), eval_dataset=_PairDataset(x[64:], y[64:]),
        optimizers=(optimizer, scheduler), callbacks=[*callbacks, PolicySchedulerCallback(**(callback_kwargs or {}))],
        compute_metrics=compute_metrics,
    )
    return trainer, lrs, scheduler


def test_hf_epoch_strategy_decides_once_per_evaluation(tmp_path, policy_path):
    trainer, lrs, scheduler = _hf_trainer(tmp_path, policy_path, num_train_epochs=3)
    trainer.train()
    assert scheduler.total_epochs == 3  # deferred: one decision per planned evaluation
    assert len(lrs) == 3 * HF_STEPS_PER_EPOCH  # and Trainer's step() after every optimizer step changed nothing:
    _assert_changes_exactly_at(lrs, [4, 8], scheduler.history)
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    eval_logs = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert [h["train_loss"] for h in scheduler.history] == [log["loss"] for log in train_logs]
    assert [h["val_loss"] for h in scheduler.history] == [log["eval_loss"] for log in eval_logs]
    assert scheduler.get_last_lr()[0] == scheduler.history[-1]["lr"]
    # the Trainer logs the LR its optimizer steps ran with
    assert [log["learning_rate"] for log in train_logs] == [lrs[3], lrs[7], lrs[11]]
    # an evaluation outside train() decides nothing
    decided, lr = list(scheduler.history), scheduler.get_last_lr()
    trainer.evaluate()
    assert scheduler.history == decided and scheduler.get_last_lr() == lr


def test_hf_steps_strategy_decides_at_each_evaluation_with_the_mean_logged_loss(tmp_path, policy_path):
    trainer, lrs, scheduler = _hf_trainer(
        tmp_path, policy_path, num_train_epochs=3, eval_strategy="steps", eval_steps=5, logging_strategy="steps",
        logging_steps=2, logging_first_step=True, eval_on_start=True,
    )
    trainer.train()
    # 12 steps, evaluations at 5, 10 and the last step (12); eval_on_start does not decide
    assert scheduler.total_epochs == 3 and len(scheduler.history) == 3
    _assert_changes_exactly_at(lrs, [5, 10], scheduler.history)
    # logs at steps 1, 2, 4, 6, ..., 12, and at the evaluation at step 5 (the callback's): each decision reads the
    # step-weighted mean of the losses logged since the previous one (steps 1-5, then 6-10, then 11-12)
    logs = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
    assert [step for step, _ in logs] == [1, 2, 4, 5, 6, 8, 10, 12]
    previous = 0
    windows: dict[int, list[tuple[float, int]]] = {5: [], 10: [], 12: []}
    for step, loss in logs:
        windows[next(d for d in windows if step <= d)].append((loss, step - previous))
        previous = step
    for h, window in zip(scheduler.history, windows.values()):
        expected = sum(loss * w for loss, w in window) / sum(w for _, w in window)
        assert h["train_loss"] == pytest.approx(expected, rel=1e-12)
    assert scheduler.history[0]["train_loss"] != pytest.approx(sum(loss for loss, _ in windows[5]) / len(windows[5]))
    trainer.evaluate()  # outside training: no decision
    assert len(scheduler.history) == 3


@pytest.mark.parametrize(
    "schedule",
    [{}, {"eval_strategy": "steps", "eval_steps": 4, "logging_strategy": "steps", "logging_steps": 2}],
    ids=["epoch", "steps-logged-twice-per-evaluation"],
)
def test_hf_resume_from_checkpoint_continues_the_exact_lr_sequence(tmp_path, policy_path, schedule):
    """Resumed from a checkpoint saved at an evaluation: the same decisions, from the same inputs. With two logs per
    evaluation, the first log after the restart must count the steps since the checkpoint, not since step 0."""
    transformers = pytest.importorskip("transformers", reason=HF_MISSING)

    class StopAfterTwoEpochs(transformers.TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            if state.epoch >= 2:
                control.should_training_stop = True  # an interruption: the plan stays 4 epochs

    saving = {"save_strategy": "steps", "save_steps": 4} if schedule else {"save_strategy": "epoch"}
    full, full_lrs, full_scheduler = _hf_trainer(tmp_path / "full", policy_path, **schedule)
    full.train()
    first, first_lrs, _ = _hf_trainer(tmp_path / "run", policy_path, callbacks=[StopAfterTwoEpochs()], **schedule,
                                      **saving)
    first.train()
    checkpoint = tmp_path / "run" / f"checkpoint-{2 * HF_STEPS_PER_EPOCH}"
    assert torch.load(checkpoint / "scheduler.pt", weights_only=True)["last_epoch"] == 2
    resumed, rest_lrs, resumed_scheduler = _hf_trainer(tmp_path / "run", policy_path, **schedule, **saving)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert len(first_lrs) == 2 * HF_STEPS_PER_EPOCH
    _assert_changes_exactly_at(full_lrs, [4, 8, 12], full_scheduler.history)
    assert first_lrs + rest_lrs == full_lrs
    assert resumed_scheduler.history == full_scheduler.history
    assert resumed_scheduler.total_epochs == 4


def test_hf_plans_epoch_evaluations_without_counting_them_one_by_one():
    """An unsized (streaming) train set under max_steps makes the Trainer's num_train_epochs sys.maxsize: the
    plan used to count the epochs one by one and never returned, hanging the run before its first step."""
    import sys
    from types import SimpleNamespace

    from controller.integrations.hf import planned_decisions

    for epochs, delay, want in ((4, 0, 4), (4, 2, 3), (4, 2.5, 2), (4, 9, 1), (sys.maxsize, 0, None)):
        args = SimpleNamespace(eval_strategy="epoch", eval_delay=delay)
        assert planned_decisions(args, SimpleNamespace(num_train_epochs=epochs)) == want


@pytest.mark.parametrize(
    "overrides, evaluated_at",
    [({"eval_delay": 2}, [8, 12, 16]),  # epochs 2, 3 and 4
     ({"eval_strategy": "steps", "eval_steps": 5, "eval_delay": 6, "logging_strategy": "steps", "logging_steps": 1},
      [10, 15, 16]),  # every 5th step from step 6 on, and the last step
     ({"eval_strategy": "steps", "eval_steps": 5, "eval_delay": 5, "logging_strategy": "steps", "logging_steps": 1},
      [5, 10, 15, 16])],  # a delay on the grid: that step evaluates
    ids=["epoch", "steps", "steps-delay-on-the-grid"],
)
def test_hf_plans_and_decides_only_the_evaluations_after_eval_delay(tmp_path, policy_path, overrides, evaluated_at):
    trainer, lrs, scheduler = _hf_trainer(tmp_path, policy_path, **overrides)
    trainer.train()
    eval_steps = [log["step"] for log in trainer.state.log_history if "eval_loss" in log]
    assert eval_steps == evaluated_at
    assert scheduler.total_epochs == len(evaluated_at)  # the plan counts the delayed evaluations out
    assert [h["epoch"] for h in scheduler.history] == list(range(1, len(evaluated_at) + 1))  # one per evaluation
    assert scheduler.history[-1]["obs"][FEATURE_NAMES.index("progress")] == 1.0
    _assert_changes_exactly_at(lrs, evaluated_at[:-1], scheduler.history)
    # the first decision reads every training loss logged before it, delayed evaluations' steps included
    logs = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
    before, previous = [], 0
    for step, loss in logs:
        if step <= evaluated_at[0]:
            before.append((loss, step - previous))
            previous = step
    total = sum(loss * w for loss, w in before) / sum(w for _, w in before)
    assert scheduler.history[0]["train_loss"] == pytest.approx(total, rel=1e-12)
    # and the hook's window holds every optimizer step before it
    assert scheduler.history[0]["obs"][FEATURE_NAMES.index("log10_steps")] == pytest.approx(np.log10(evaluated_at[0]) / 2)


def test_hf_refuses_runs_that_never_evaluate(tmp_path, policy_path):
    trainer, _, _ = _hf_trainer(tmp_path, policy_path, eval_strategy="no")
    with pytest.raises(ValueError, match="eval_strategy"):
        trainer.train()


def test_hf_passes_the_named_accuracy_metric_as_val_accuracy(tmp_path, policy_path):
    def compute_metrics(prediction):  # a stand-in accuracy, different at each evaluation
        return {"accuracy": float(np.clip(np.abs(prediction.predictions).mean(), 0.0, 1.0))}

    trainer, _, scheduler = _hf_trainer(tmp_path, policy_path, callback_kwargs={"accuracy_metric": "eval_accuracy"},
                                        compute_metrics=compute_metrics, num_train_epochs=2)
    trainer.train()
    logged = [e["eval_accuracy"] for e in trainer.state.log_history if "eval_accuracy" in e]
    assert [h["val_accuracy"] for h in scheduler.history] == pytest.approx(logged[:len(scheduler.history)])
    assert all(h["obs"][FEATURE_NAMES.index("has_accuracy")] == 1.0 for h in scheduler.history)


@pytest.mark.parametrize(
    "callback_kwargs, message",
    [({"metric": "eval_nope"}, "metric='eval_nope'.* is not among the evaluation metrics"),
     ({"accuracy_metric": "eval_accuracy"}, "accuracy_metric='eval_accuracy'.* is not among the evaluation metrics")],
    ids=["metric", "accuracy-metric"],
)
def test_hf_names_a_metric_the_evaluation_does_not_report(tmp_path, policy_path, callback_kwargs, message):
    trainer, _, scheduler = _hf_trainer(tmp_path, policy_path, callback_kwargs=callback_kwargs, num_train_epochs=1)
    with pytest.raises(KeyError, match=message):
        trainer.train()
    assert scheduler.history == []


def test_hf_reads_the_validation_loss_from_any_of_several_evaluation_sets(tmp_path, policy_path):
    """eval_dataset={"a": ..., "b": ...}: the Trainer evaluates each set in turn, one on_evaluate call each."""
    trainer, _, scheduler = _hf_trainer(tmp_path, policy_path, callback_kwargs={"metric": "eval_b_loss"},
                                        num_train_epochs=2)
    first = trainer.eval_dataset
    x, y = _regression_data(32, seed=5)
    trainer.eval_dataset = {"a": first, "b": _PairDataset(x, y)}
    trainer.train()
    logged = [e["eval_b_loss"] for e in trainer.state.log_history if "eval_b_loss" in e]
    assert len(logged) == 2 and [h["val_loss"] for h in scheduler.history] == pytest.approx(logged)
    # the set that carries the metric may come first: the sets after it, without it, are no error
    trainer, _, scheduler = _hf_trainer(tmp_path / "a", policy_path, callback_kwargs={"metric": "eval_a_loss"},
                                        num_train_epochs=2)
    trainer.eval_dataset = {"a": first, "b": _PairDataset(x, y)}
    trainer.train()
    logged = [e["eval_a_loss"] for e in trainer.state.log_history if "eval_a_loss" in e]
    assert len(logged) == 2 and [h["val_loss"] for h in scheduler.history] == pytest.approx(logged)
    trainer, _, scheduler = _hf_trainer(tmp_path / "c", policy_path, callback_kwargs={"metric": "eval_c_loss"},
                                        num_train_epochs=2)
    trainer.eval_dataset = {"a": first, "b": _PairDataset(x, y)}
    with pytest.raises(KeyError, match=r"metric='eval_c_loss'.* not among the evaluation metrics .*'eval_a_loss'.*"
                                       r"'eval_b_loss'"):
        trainer.train()
    assert scheduler.history == []


def test_hf_callback_reused_after_a_failed_train_forgets_that_runs_evaluations(tmp_path, policy_path):
    """A train() ended by an exception after an evaluation that lacked the metric (before the callback could say so)
    leaves nothing behind: the same callback in the next train() decides from its own evaluations."""
    from transformers import TrainerCallback

    from controller.integrations.hf import PolicySchedulerCallback

    class Boom(TrainerCallback):  # before the policy callback in the list: its on_step_begin runs first
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step >= HF_STEPS_PER_EPOCH:
                raise RuntimeError("boom")

    reported: list[dict] = [{}, {"acc": 0.5}]  # the first run's evaluation lacks eval_acc; the second's has it
    trainer, _, _ = _hf_trainer(tmp_path / "1", policy_path, callbacks=[Boom()], num_train_epochs=2,
                                callback_kwargs={"metric": "eval_acc"}, compute_metrics=lambda p: reported[0])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    [callback] = [c for c in trainer.callback_handler.callbacks if isinstance(c, PolicySchedulerCallback)]
    reported.pop(0)
    trainer, _, scheduler = _hf_trainer(tmp_path / "2", policy_path, num_train_epochs=2,
                                        compute_metrics=lambda p: reported[0])
    trainer.remove_callback(PolicySchedulerCallback)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.scheduler is scheduler and [h["val_loss"] for h in scheduler.history] == [0.5, 0.5]


def test_hf_warns_when_an_explicit_total_differs_from_the_planned_evaluations(tmp_path, policy_path):
    trainer, _, scheduler = _hf_trainer(tmp_path, policy_path, total_epochs=5, num_train_epochs=2)
    with pytest.warns(RuntimeWarning, match=r"total_epochs=5\) but the Trainer plans 2 evaluations"):
        trainer.train()
    assert scheduler.total_epochs == 5 and len(scheduler.history) == 2  # kept as given; a decision per evaluation


@pytest.mark.parametrize("total_epochs", [None, 2], ids=["deferred-total", "explicit-total"])
def test_hf_without_the_callback_warns_that_nothing_will_decide(tmp_path, policy_path, total_epochs):
    trainer, lrs, scheduler = _hf_trainer(tmp_path, policy_path, num_train_epochs=2, total_epochs=total_epochs)
    trainer.callback_handler.callbacks = [c for c in trainer.callback_handler.callbacks
                                          if type(c).__name__ != "PolicySchedulerCallback"]
    with pytest.warns(RuntimeWarning, match="add its callback") as caught:
        trainer.train()
    assert len([w for w in caught if "add its callback" in str(w.message)]) == 1  # once, not at every step
    assert scheduler.history == [] and set(lrs) == {0.05}


def test_hf_epoch_plan_under_max_steps_over_a_streaming_train_set_is_unknown(tmp_path, policy_path):
    """A train set with no length under max_steps: the Trainer runs epochs until the steps are spent and sets
    num_train_epochs to sys.maxsize. Taken as the plan, every decision saw progress ~0."""
    x, y = _regression_data(64, seed=1)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return ({"x": a, "labels": b} for a, b in zip(x, y))

    def trainer(total_epochs):
        trainer, _, scheduler = _hf_trainer(tmp_path, policy_path, total_epochs=total_epochs, max_steps=10)
        trainer.train_dataset = Stream()
        return trainer, scheduler

    with pytest.raises(ValueError, match=r"max_steps=10 the Trainer cannot say how many epochs .* total_epochs=N"):
        trainer(None)[0].train()
    run, scheduler = trainer(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "but the Trainer plans ..." against a made-up plan
        run.train()
    # 4 steps an epoch: epochs end at steps 4, 8 and (cut short by max_steps) 10, each evaluated
    assert [h["obs"][FEATURE_NAMES.index("progress")] for h in scheduler.history] == pytest.approx([1 / 3, 2 / 3, 1])


def test_hf_callback_refuses_another_scheduler(tmp_path, policy_path):
    trainer, _, _ = _hf_trainer(tmp_path, policy_path,
                                scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4))
    with pytest.raises(ValueError, match="needs the Trainer's scheduler to be a PolicyScheduler, got CosineAnnealingLR"):
        trainer.train()


@pytest.mark.parametrize(
    "logging",
    [{"logging_strategy": "steps", "logging_steps": 5}, {"logging_strategy": "steps", "logging_steps": 500},
     {"logging_strategy": "no"}],
    ids=["eval-steps-off-grid-at-the-end", "logging-sparser-than-evaluation", "no-logging"],
)
def test_hf_every_decision_reads_the_training_loss_since_the_previous_one(tmp_path, policy_path, logging):
    """12 steps, evaluations at 5, 10 and the last step, 12, off the eval grid. The Trainer logged only on its logging
    grid, so the last decision (or every one) decided without a training loss under a misleading warning."""
    trainer, _, scheduler = _hf_trainer(tmp_path, policy_path, num_train_epochs=3, eval_strategy="steps",
                                        eval_steps=5, **logging)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in particular no "no training loss was logged"
        trainer.train()
    logs = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
    assert [step for step, _ in logs] == [5, 10, 12]  # the eval steps; sparser logging adds none
    assert [h["train_loss"] for h in scheduler.history] == [loss for _, loss in logs]


def test_hf_warns_when_a_later_callback_cancels_the_log_before_a_decision(tmp_path, policy_path):
    transformers = pytest.importorskip("transformers", reason=HF_MISSING)

    class NeverLog(transformers.TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            control.should_log = False

    trainer, _, scheduler = _hf_trainer(tmp_path, policy_path, num_train_epochs=1)
    trainer.add_callback(NeverLog())  # after PolicySchedulerCallback
    with pytest.warns(RuntimeWarning, match="cancelled that log"):
        trainer.train()
    assert len(scheduler.history) == 1 and scheduler.history[0]["train_loss"] is None


# ---------------------------------------------------------------------------------------------------
# Optional extras


@pytest.mark.parametrize(
    "module, libraries, extra",
    [("controller.integrations.lightning", ["pytorch_lightning", "lightning"], "lightning"),
     ("controller.integrations.hf", ["transformers"], "hf")],
)
def test_integration_names_the_extra_to_install_when_its_library_is_missing(module, libraries, extra):
    code = (
        f"import sys\nfor name in {libraries!r}:\n    sys.modules[name] = None  # as if not installed\n"
        f"try:\n    import {module}\nexcept ImportError as err:\n    assert 'lrcontrol[{extra}]' in str(err), err\n"
        "else:\n    raise SystemExit('imported without its library')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_lightning_integration_works_with_the_lightning_package_alone():
    """`import lightning as L` users may not have pytorch_lightning: the callback is then lightning.pytorch's."""
    pytest.importorskip("lightning.pytorch", reason="the lightning package is not installed")
    code = (
        "import sys\nsys.modules['pytorch_lightning'] = None  # as if not installed\n"
        "import lightning.pytorch as L\n"
        "from controller.integrations import lightning as ours\n"
        "assert issubclass(ours.PolicySchedulerCallback, L.Callback), ours.PolicySchedulerCallback.__mro__\n"
        "assert ours.extract_batch_size.__module__.startswith('lightning.pytorch')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
