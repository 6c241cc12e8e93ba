"""controller.features, controller.signals and controller.actions."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from controller.actions import ActionConfig, lr_factor, next_lr
from controller.features import CLIP, FEATURE_NAMES, N_FEATURES, FeatureBuilder, optimizer_kind
from controller.signals import (
    PROBE_BLOCK,
    PROBE_COORDS,
    StepStats,
    StepStatsHook,
    _ProbePlan,
    probe_coordinates,
    probe_values,
    summarize_grad_norms,
)

EXTREMES = [0.0, 1e-30, 1e30, math.nan, math.inf, -math.inf, -1.0]


def test_import_controller_stays_light():
    code = (
        "import sys, controller\n"
        "heavy = [m for m in ('gymnasium', 'stable_baselines3', 'mlflow', 'click', 'envs', 'pytorch_lightning',\n"
        "         'lightning', 'transformers', 'accelerate', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("value", EXTREMES)
def test_features_finite_and_bounded_for_extreme_inputs(value):
    fb = FeatureBuilder(total_epochs=10, initial_lr=1e-3, optimizer="adam")
    stats = StepStats(0, value, value, value, value, value)
    for epoch in range(1, 4):
        obs = fb.observe(epoch=epoch, lr=value if epoch == 2 else 1e-3, train_loss=value, val_loss=value,
                         val_accuracy=value, stats=stats)
        assert obs.shape == (N_FEATURES,) and obs.dtype == np.float32
        assert np.isfinite(obs).all(), dict(zip(FEATURE_NAMES, obs))
        assert np.all(np.abs(obs) <= CLIP)


def test_features_relative_values():
    fb = FeatureBuilder(total_epochs=4, initial_lr=0.1, optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    stats = StepStats(100, 2.0, 0.5, 0.1, 1e-3, -0.2)
    fb.observe(epoch=1, lr=0.1, train_loss=2.0, val_loss=2.0, val_accuracy=0.5, stats=stats)
    obs = dict(zip(FEATURE_NAMES, fb.observe(epoch=2, lr=0.4, train_loss=1.0, val_loss=4.0, stats=stats)))
    assert obs["progress"] == pytest.approx(0.5)
    assert obs["log2_lr_rel_initial"] == pytest.approx(0.5)
    assert obs["opt_sgd"] == 1 and obs["opt_adam"] == 0
    assert obs["log_train_rel_first"] == pytest.approx(math.log(0.5) / 2)
    assert obs["log_val_rel_best"] == pytest.approx(2 * math.log(2))
    assert obs["dlog_val"] == pytest.approx(min(5 * math.log(2), CLIP))
    assert obs["has_accuracy"] == 0 and obs["val_accuracy"] == 0
    assert obs["log10_update_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert obs["grad_cos"] == pytest.approx(-0.2)
    assert obs["log10_steps"] == pytest.approx(1.0)


def test_feature_state_round_trip(tmp_path):
    """Restored mid-run, after epochs that made first, best and previous values all differ, a builder continues
    exactly: same observations, same state (the safety rule's last/best-before-last values included)."""
    a = FeatureBuilder(10, 1e-3, "adam")
    epochs = [(1e-3, 2.0, 1.9, StepStats(50, 3.0, 0.2, 0.1, 1e-3, 0.1)),
              (2e-3, 1.5, 1.2, StepStats(50, 2.0, 0.3, -0.1, 2e-3, -0.2)),
              (4e-3, 1.8, 1.6, StepStats(50, 2.5, 0.4, 0.2, 3e-3, -0.4))]
    for epoch, (lr, train, val, stats) in enumerate(epochs, 1):
        a.observe(epoch=epoch, lr=lr, train_loss=train, val_loss=val, stats=stats)
    torch.save(a.state_dict(), tmp_path / "features.pt")
    b = FeatureBuilder(10, 5e-2, "sgd")  # its own arguments are replaced too
    b.load_state_dict(torch.load(tmp_path / "features.pt", weights_only=True))
    assert b.state_dict() == a.state_dict()
    for epoch, (train, val) in enumerate([(1.7, 1.5), (1.4, 1.3)], 4):
        kw = dict(epoch=epoch, lr=3e-3, train_loss=train, val_loss=val, stats=StepStats(50, 1.5, 0.1, 0.0, 1e-3, 0.0))
        np.testing.assert_array_equal(a.observe(**kw), b.observe(**kw))
        assert b.state_dict() == a.state_dict()
    with pytest.raises(ValueError, match="unknown FeatureBuilder state keys: \\['best'\\]"):
        b.load_state_dict({"best": 1.0})


def test_non_finite_inputs_read_as_far_worse_and_leave_the_references_alone():
    """A NaN or inf loss reads as +CLIP in every log ratio it enters; a NaN accuracy as no accuracy; and none of them
    becomes the first, best or previous value the next finite epoch is compared with."""
    fb = FeatureBuilder(total_epochs=4, initial_lr=0.1, optimizer="sgd")
    fb.observe(epoch=1, lr=0.1, train_loss=2.0, val_loss=2.0, val_accuracy=0.5)
    bad = dict(zip(FEATURE_NAMES, fb.observe(epoch=2, lr=0.1, train_loss=math.nan, val_loss=math.inf,
                                            val_accuracy=math.nan)))
    assert bad["log_train_rel_first"] == bad["log_val_rel_first"] == CLIP / 2
    assert bad["log_val_rel_best"] == bad["dlog_train"] == bad["dlog_val"] == CLIP  # 2 CLIP and 5 CLIP, clipped
    assert bad["log_val_over_train"] == 0.0  # no finite train loss to compare with
    assert bad["val_accuracy"] == bad["has_accuracy"] == 0.0
    assert (fb.first_train, fb.first_val, fb.best_val, fb.prev_train, fb.prev_val) == (2.0, 2.0, 2.0, 2.0, 2.0)
    assert math.isinf(fb.last_val) and fb.best_before_last == 2.0  # the safety rule sees the blow-up
    nan_val = dict(zip(FEATURE_NAMES, fb.observe(epoch=3, lr=0.1, train_loss=1.0, val_loss=math.nan)))
    assert nan_val["log_val_rel_first"] == CLIP / 2 and nan_val["log_val_over_train"] == CLIP
    # the next finite epoch compares with the last finite one (epoch 1 for val, epoch 3 for train)
    good = dict(zip(FEATURE_NAMES, fb.observe(epoch=4, lr=0.1, train_loss=0.5, val_loss=1.0)))
    assert good["dlog_train"] == pytest.approx(5 * math.log(0.5))
    assert good["dlog_val"] == pytest.approx(max(5 * math.log(0.5), -CLIP))
    assert good["log_val_rel_best"] == 0.0 and fb.best_val == 1.0


def test_optimizer_kind():
    p = [torch.zeros(1, requires_grad=True)]
    assert optimizer_kind(torch.optim.SGD(p, lr=0.1)) == "sgd"
    for adam_like in (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax):
        assert optimizer_kind(adam_like(p)) == "adam", adam_like.__name__
    for other in (torch.optim.Adagrad, torch.optim.RMSprop, torch.optim.Adadelta, torch.optim.Rprop):
        assert optimizer_kind(other(p)) == "other", other.__name__

    class MyAdamW(torch.optim.AdamW):  # a subclass is of its base's kind
        pass

    assert optimizer_kind(MyAdamW(p)) == "adam" and optimizer_kind("MyAdamW") == "other"


def test_hook_grad_norm_cosine_and_update_ratio_match_by_hand():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(torch.randn(3))
    lr = 0.05
    opt = torch.optim.SGD([w, b], lr=lr)
    hook = StepStatsHook(opt)
    norms, grads, weights = [], [], []
    for step in range(3):
        opt.zero_grad()
        x = torch.randn(4, 5)
        ((x @ w + b) ** 2).sum().backward()
        g = torch.cat([w.grad.reshape(-1), b.grad.reshape(-1)])
        norms.append(g.norm().item())
        grads.append(g.clone())
        opt.step()
        weights.append(torch.cat([w.detach().reshape(-1), b.detach().reshape(-1)]).clone())
    stats = hook.collect()
    assert stats.steps == 3
    assert stats.grad_norm_mean == pytest.approx(np.mean(norms), rel=1e-6)
    assert stats.grad_norm_cv == pytest.approx(np.std(norms) / np.mean(norms), rel=1e-5)
    assert stats.grad_norm_trend == pytest.approx(math.log(norms[2] / norms[0]), rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0).item()
    assert stats.grad_cos == pytest.approx(cos, rel=1e-5)
    ratio = ((weights[1] - weights[0]).norm() / weights[0].norm()).item()
    assert stats.update_ratio == pytest.approx(ratio, rel=1e-5)
    assert hook.collect().steps == 0


def test_hook_samples_sparsely_on_long_epochs():
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=0.01)
    hook = StepStatsHook(opt)
    for epoch in range(2):
        norms = []
        for _ in range(640):
            opt.zero_grad()
            (w**2).sum().backward()
            norms.append(w.grad.norm().item())
            opt.step()
        stats = hook.collect()
        assert stats.steps == 640
        if epoch == 0:  # every step sampled: the sample buffer grew from 64 to 1024 and kept every value
            assert stats.grad_norm_mean == pytest.approx(np.mean(norms), rel=1e-6)
            trend = math.log(np.mean(norms[320:]) / np.mean(norms[:320]))
            assert stats.grad_norm_trend == pytest.approx(trend, rel=1e-5)
    assert len(hook.state_dict()["norms"]) == 0
    # second epoch sampled every 40th step: 16 norms, 4 probe pairs
    assert hook._norm_every == 40 and hook._probe_every == 160


def test_probe_coordinates_are_evenly_spaced_blocks_of_large_models():
    assert probe_coordinates(PROBE_COORDS) is None
    for n in (PROBE_COORDS + 1, 203_530, 10**8):
        index = probe_coordinates(n)
        assert index.numel() == PROBE_COORDS and index[0] == 0 and index[-1] == n - 1
        assert bool((index.diff() > 0).all()), "sorted, no coordinate twice"
        blocks = index.view(-1, PROBE_BLOCK)
        assert bool((blocks.diff(dim=1) == 1).all()), "contiguous blocks"
        gaps = blocks[1:, 0] - blocks[:-1, 0]
        assert int(gaps.max() - gaps.min()) <= 1, "evenly spaced"


def test_hook_probes_a_sketch_of_large_models_by_hand():
    """Above PROBE_COORDS parameters the probe compares the probe_coordinates blocks of the
    parameters that have gradients (here a frozen-by-disuse parameter sits between two used ones)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(300, 256) * 0.05)
    unused = torch.nn.Parameter(torch.randn(1000))
    b = torch.nn.Parameter(torch.randn(256))
    opt = torch.optim.Adam([w, unused, b], lr=1e-2)
    hook = StepStatsHook(opt)
    index = probe_coordinates(w.numel() + b.numel())
    assert index is not None
    grads, weights = [], []
    for _ in range(2):
        opt.zero_grad()
        x = torch.randn(8, 300)
        (torch.tanh(x @ w + b) ** 2).sum().backward()
        grads.append(torch.cat([w.grad.reshape(-1), b.grad.reshape(-1)])[index].clone())
        opt.step()
        weights.append(torch.cat([w.detach().reshape(-1), b.detach().reshape(-1)])[index].clone())
    stats = hook.collect()
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0).item()
    assert stats.grad_cos == pytest.approx(cos, rel=1e-5)
    ratio = ((weights[1] - weights[0]).norm() / weights[0].norm()).item()
    assert stats.update_ratio == pytest.approx(ratio, rel=1e-5)


@pytest.mark.parametrize("rows", [40, 300], ids=["whole", "sketch"])
@pytest.mark.parametrize("mixed", [False, True], ids=["float32", "float32+float64"])
def test_probe_plan_fills_exactly_what_flattening_and_concatenating_gives(rows, mixed):
    """The probe's preallocated buffer holds the very values ``torch.cat`` of the flattened tensors
    (indexed by probe_coordinates above PROBE_COORDS) gives: a non-contiguous parameter, a second
    dtype, and the pair's first vectors surviving the second fill included."""
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(256, rows).t()),  # non-contiguous
        torch.nn.Parameter(torch.randn(256, dtype=torch.float64 if mixed else torch.float32)),
        torch.nn.Parameter(torch.randn(3, 5)),
    ]
    plan = _ProbePlan(params)
    index = probe_coordinates(sum(p.numel() for p in params))
    assert plan.sketched == (index is not None) and plan.direct == (not mixed)

    def reference(tensors):
        flat = torch.cat([t.reshape(-1) for t in tensors])
        return flat if index is None else flat[index]

    expected = []
    for step in range(2):
        grads = [torch.randn(256, rows).t(), *(torch.randn_like(p) for p in params[1:])]  # one non-contiguous
        with torch.no_grad():  # as inside the hook
            for p in params:
                p.add_(0.1)
            filled = plan.fill(step, grads)
        expected.append((reference(grads), reference([p.detach() for p in params])))
        assert all(torch.equal(a, b) for a, b in zip(filled, expected[-1]))
    first = plan.vectors[0]
    assert all(torch.equal(a, b) for a, b in zip(first, expected[0])), "the second fill left the first step's alone"


@pytest.mark.parametrize(
    "sizes",
    [
        [7, 300 * 256, 3, 100, 5000, 1, 70_000],  # parameters inside one block, blocks straddling several
        [PROBE_COORDS + 1],  # one parameter; blocks 256 apart, so touching
        [255, 257, 100_000, 256, 511],  # a partial block at either end of the large one
        [10**6],
    ],
    ids=["mixed", "touching", "edges", "one"],
)
def test_probe_plan_sketch_fills_the_sketch_coordinates_for_any_layout(sizes):
    """On the sketch, a parameter's share is whole blocks (copied as rows) and partial blocks at its
    ends (copied as runs): for any layout of parameter sizes, the buffer holds exactly the values
    indexing the concatenated vector at ``probe_coordinates`` gives."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    plan = _ProbePlan(params)
    index = probe_coordinates(sum(sizes))
    assert plan.sketched and plan.buffer.shape[-1] == PROBE_COORDS
    grads = [torch.randn(n) for n in sizes]
    with torch.no_grad():  # as inside the hook
        grad, weight = plan.fill(1, grads)
    assert torch.equal(grad, torch.cat(grads)[index])
    assert torch.equal(weight, torch.cat([p.detach() for p in params])[index])


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adagrad])
def test_hook_reads_sparse_gradients_as_their_dense_equivalent(optimizer):
    """nn.Embedding(sparse=True) gives uncoalesced COO gradients (a repeated index is two entries):
    the hook's norms and probe equal those of the dense gradients, and nothing crashes."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(20, 4, sparse=True)
    head = torch.nn.Linear(4, 1)
    opt = optimizer([*emb.parameters(), *head.parameters()], lr=0.1)
    hook = StepStatsHook(opt)
    norms, grads, weights = [], [], []
    for tokens in ([3, 3, 7, 11], [3, 5, 5, 5]):
        opt.zero_grad()
        (head(emb(torch.tensor(tokens))) ** 2).sum().backward()
        assert emb.weight.grad.is_sparse and not emb.weight.grad.is_coalesced()
        dense = torch.cat([emb.weight.grad.to_dense().reshape(-1), head.weight.grad.reshape(-1), head.bias.grad])
        norms.append(dense.norm().item())
        grads.append(dense)
        opt.step()
        weights.append(torch.cat([p.detach().reshape(-1) for p in (emb.weight, head.weight, head.bias)]))
    stats = hook.collect()
    assert stats.steps == 2
    assert stats.grad_norm_mean == pytest.approx(np.mean(norms), rel=1e-6)
    assert stats.grad_cos == pytest.approx(torch.nn.functional.cosine_similarity(*grads, dim=0).item(), rel=1e-5)
    ratio = ((weights[1] - weights[0]).norm() / weights[0].norm()).item()
    assert stats.update_ratio == pytest.approx(ratio, rel=1e-5)


@pytest.mark.parametrize(
    ("dtype", "rel"),
    [(torch.bfloat16, 2e-2), (torch.float64, 1e-6), (torch.complex64, 1e-5)],
    ids=["bfloat16", "float64", "complex64"],
)
def test_hook_by_hand_in_other_dtypes(dtype, rel):
    """Half precision, double and complex parameters: the signals match a by-hand float64 computation
    (complex ones compared through their real and imaginary parts; samples are kept in float32), and
    nothing crashes."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hook = StepStatsHook(opt)

    def flat(tensors):
        return torch.cat([(torch.view_as_real(t) if t.is_complex() else t).double().reshape(-1) for t in tensors])

    norms, grads, weights = [], [], []
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 6, dtype=dtype)).abs().float().pow(2).sum().backward()
        grads.append(flat([p.grad for p in model.parameters()]))
        norms.append(grads[-1].norm().item())
        opt.step()
        weights.append(flat([p.detach() for p in model.parameters()]))
    stats = hook.collect()
    assert stats.grad_norm_mean == pytest.approx(np.mean(norms), rel=rel)
    assert stats.grad_cos == pytest.approx(torch.nn.functional.cosine_similarity(*grads, dim=0).item(), rel=rel)
    ratio = ((weights[1] - weights[0]).norm() / weights[0].norm()).item()
    assert stats.update_ratio == pytest.approx(ratio, rel=rel)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", [300.0, 1e5])
def test_half_precision_gradients_past_its_range_give_true_signals(dtype, norm):
    """Half-precision gradient norms of 300 and 1e5 (a product of two norms past 65504 made the cosine
    inf / inf = NaN in float16, and 1e5 itself overflows it): the probe and the norms are taken in float32."""
    p = torch.nn.Parameter(torch.ones(1000, dtype=dtype))
    opt = torch.optim.SGD([p], lr=1e-9)
    hook = StepStatsHook(opt)
    for _ in range(16):
        p.grad = torch.full_like(p, norm / 1000**0.5)  # successive gradients identical: cosine 1
        opt.step()
    stats = hook.collect()
    assert stats.grad_cos == pytest.approx(1.0, abs=1e-5)
    assert stats.grad_norm_mean == pytest.approx(norm, rel=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("first", ["cuda", "cpu"])
@pytest.mark.parametrize("width", [8, 256], ids=["whole", "sketch"])
def test_hook_by_hand_on_a_model_split_over_devices(first, width):
    """Parameters on CPU and CUDA in one optimizer (a model split over devices): the norms meet on
    the first parameter's device and the probe copies across; the signals match a by-hand computation."""
    torch.manual_seed(0)
    second = "cpu" if first == "cuda" else "cuda"
    a, b = torch.nn.Linear(300, width).to(first), torch.nn.Linear(width, 1).to(second)
    opt = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.05)
    hook = StepStatsHook(opt)

    def flat(tensors):
        return torch.cat([t.detach().double().cpu().reshape(-1) for t in tensors])

    params = [*a.parameters(), *b.parameters()]
    index = probe_coordinates(sum(p.numel() for p in params))
    assert (index is None) == (width == 8)
    norms, grads, weights = [], [], []
    for _ in range(2):
        opt.zero_grad()
        b(a(torch.randn(16, 300, device=first)).to(second)).pow(2).sum().backward()
        grads.append(flat([p.grad for p in params]))
        norms.append(grads[-1].norm().item())
        opt.step()
        weights.append(flat(params))
    if index is not None:
        grads, weights = [g[index] for g in grads], [w[index] for w in weights]
    stats = hook.collect()
    assert stats.grad_norm_mean == pytest.approx(np.mean(norms), rel=1e-5)
    assert stats.grad_cos == pytest.approx(torch.nn.functional.cosine_similarity(*grads, dim=0).item(), rel=1e-4)
    ratio = ((weights[1] - weights[0]).norm() / weights[0].norm()).item()
    assert stats.update_ratio == pytest.approx(ratio, rel=1e-4)


def test_hook_watches_a_parameter_frozen_when_it_was_built_once_it_trains():
    """A parameter in the optimizer but frozen when the hook is built (fine-tuning) counts from the
    first step it has a gradient."""
    frozen, live = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    frozen.requires_grad_(False)
    opt = torch.optim.SGD([frozen, live], lr=0.1)
    hook = StepStatsHook(opt)
    frozen.requires_grad_(True)
    opt.zero_grad()
    (3 * frozen.sum() + 4 * live.sum()).backward()
    opt.step()
    assert hook.collect().grad_norm_mean == pytest.approx(math.sqrt(3 * 9 + 2 * 16))


def test_hook_skips_a_probe_pair_whose_steps_trained_different_parameters():
    """A cosine between one parameter's gradient and another's means nothing: a pair whose two steps have gradients
    on different parameters (here of the same size, so nothing else would notice) gives no probe sample."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([a, b], lr=0.1)
    hook = StepStatsHook(opt)
    for p, scale in ((a, 2.0), (b, 3.0)):  # step 0 starts a probe pair on a, step 1 ends it on b
        opt.zero_grad(set_to_none=True)
        (scale * p.sum()).backward()
        opt.step()
    stats = hook.collect()
    assert stats.steps == 2 and stats.grad_norm_mean == pytest.approx((2 + 3) * math.sqrt(3) / 2)
    assert math.isnan(stats.grad_cos) and math.isnan(stats.update_ratio)


def test_summarize_grad_norms_by_hand():
    mean, cv, trend = summarize_grad_norms([1.0, 3.0, 2.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert cv == pytest.approx(np.std([1, 3, 2, 6]) / 3.0)
    assert trend == pytest.approx(math.log(4.0 / 2.0))
    assert summarize_grad_norms([2.0])[1:] == (0.0, 0.0)
    assert all(math.isnan(v) for v in summarize_grad_norms([]))


def test_probe_values_are_batched():
    g0, g1, w0, w1 = (torch.randn(4, 9, dtype=torch.float64) for _ in range(4))
    cos, ratio = probe_values(g0, g1, w0, w1)
    for i in range(4):
        c, r = probe_values(g0[i], g1[i], w0[i], w1[i])
        assert torch.allclose(cos[i], c) and torch.allclose(ratio[i], r)


def test_action_map_and_safety_rule():
    cfg = ActionConfig()
    assert lr_factor(1.0) == 2.0 and lr_factor(-1.0) == 0.5 and lr_factor(7.0) == 2.0 and lr_factor(math.nan) == 1.0
    lr, cut = next_lr(1e-3, 1e-3, 1.0, val_loss=1.0, best_val_loss=0.9, config=cfg)
    assert lr == pytest.approx(2e-3) and not cut
    lr, cut = next_lr(1e-3, 1e-3, 1.0, val_loss=1.3, best_val_loss=1.0, config=cfg)
    assert lr == pytest.approx(1e-3) and not cut  # hold: no rise while 30 % above the best
    lr, cut = next_lr(1e-3, 1e-3, -1.0, val_loss=1.3, best_val_loss=1.0, config=cfg)
    assert lr == pytest.approx(5e-4)  # a cut is still allowed
    lr, cut = next_lr(1e-3, 1e-3, 1.0, val_loss=3.0, best_val_loss=1.0, config=cfg)
    assert cut and lr == pytest.approx(1e-3 * cfg.cut_factor)
    lr, cut = next_lr(1e-3, 1e-3, 0.0, val_loss=math.nan, best_val_loss=1.0, config=cfg)
    assert cut and lr == pytest.approx(2.5e-4)
    wide = ActionConfig(scale=3.0)  # a policy's own move below the cut (x1/8 < x1/4) is kept: the cut is a ceiling
    lr, cut = next_lr(1e-3, 1e-3, -1.0, val_loss=3.0, best_val_loss=1.0, config=wide)
    assert cut and lr == pytest.approx(1e-3 / 8)
    lr, _ = next_lr(1e-3 * cfg.max_ratio, 1e-3, 1.0, val_loss=1.0, best_val_loss=1.0, config=cfg)
    assert lr == pytest.approx(1e-3 * cfg.max_ratio)
    lr, _ = next_lr(1e-3 * cfg.min_ratio, 1e-3, -1.0, val_loss=1.0, best_val_loss=1.0, config=cfg)
    assert lr == pytest.approx(1e-3 * cfg.min_ratio) and lr > 0
    assert ActionConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs, message",
    [({"scale": 0.0}, "scale must be positive"), ({"scale": math.inf}, "scale must be positive"),
     ({"min_ratio": 0.0}, "0 < min_ratio <= 1 <= max_ratio"), ({"max_ratio": 0.5}, "0 < min_ratio <= 1 <= max_ratio"),
     ({"max_ratio": math.inf}, "max_ratio < inf"), ({"blowup_ratio": 1.0}, "blowup_ratio must be > 1"),
     ({"cut_factor": 1.5}, "cut_factor must be in"), ({"hold_ratio": 3.0}, "1 < hold_ratio <= blowup_ratio")],
)
def test_action_config_refuses_a_rule_that_cannot_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ActionConfig(**kwargs)


def test_action_map_from_a_file_refuses_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown action map fields: \['warmup'\]"):
        ActionConfig.from_dict({**ActionConfig().to_dict(), "warmup": 3})


def test_every_feature_pinned_by_hand():
    """All 19 features from hand-computed values, with inputs that give every feature that is not a 0/1 flag its own
    value (the env-vs-scheduler parity tests share this code, so only a test like this one sees a definition change)."""
    fb = FeatureBuilder(total_epochs=4, initial_lr=0.1, optimizer="sgd")
    fb.observe(epoch=1, lr=0.1, train_loss=2.0, val_loss=2.0, stats=StepStats(100, 2.0, 0.5, 0.1, 1e-3, -0.2))
    obs = dict(zip(FEATURE_NAMES, fb.observe(epoch=2, lr=0.8, train_loss=1.5, val_loss=3.0, val_accuracy=0.7,
                                            stats=StepStats(400, 4.0, 0.3, 0.2, 1e-2, -0.35))))
    want = {"progress": 0.5, "log2_lr_rel_initial": 0.75, "log10_lr": (math.log10(0.8) + 3) / 1.5, "opt_sgd": 1,
            "opt_adam": 0, "log_train_rel_first": math.log(0.75) / 2, "log_val_rel_first": math.log(1.5) / 2,
            "log_val_rel_best": 2 * math.log(1.5), "log_val_over_train": math.log(2.0),
            "dlog_train": 5 * math.log(0.75), "dlog_val": 5 * math.log(1.5), "val_accuracy": 0.7, "has_accuracy": 1,
            "log_grad_norm_rel_first": math.log(2.0) / 2, "grad_norm_cv": 0.3, "grad_norm_trend": 0.4,
            "log10_update_ratio": (math.log10(1e-2) + 3) / 1.5, "grad_cos": -0.35, "log10_steps": math.log10(400) / 2}
    assert list(obs) == list(want)
    values = [v for k, v in want.items() if k not in ("opt_sgd", "opt_adam", "has_accuracy")]
    assert len({round(v, 9) for v in values}) == len(values)  # a swap of any two of them changes the vector
    assert obs == pytest.approx(want, rel=1e-6, abs=1e-6)
    later = fb.observe(epoch=3, lr=0.8, train_loss=1.0, val_loss=1.0)
    assert later[FEATURE_NAMES.index("log_val_rel_best")] == 0.0  # a new best


def test_unobserved_signals_read_as_zero():
    """A value that has not been observed is 0 (the module's contract): no hook statistics at all (a run with no
    optimizer step), a probe-less epoch (grad_cos and the update ratio NaN) and no validation accuracy."""
    hook_features = ["log_grad_norm_rel_first", "grad_norm_cv", "grad_norm_trend", "log10_update_ratio", "grad_cos",
                     "log10_steps"]
    fb = FeatureBuilder(total_epochs=4, initial_lr=0.1, optimizer="sgd")
    obs = dict(zip(FEATURE_NAMES, fb.observe(epoch=1, lr=0.1, train_loss=2.0, val_loss=2.0)))
    assert {k: obs[k] for k in [*hook_features, "val_accuracy", "has_accuracy"]} == dict.fromkeys(
        [*hook_features, "val_accuracy", "has_accuracy"], 0.0)
    no_probe = StepStats(100, 2.0, 0.5, 0.1, math.nan, math.nan)
    obs = dict(zip(FEATURE_NAMES, fb.observe(epoch=2, lr=0.1, train_loss=1.0, val_loss=1.0, stats=no_probe)))
    assert (obs["grad_cos"], obs["log10_update_ratio"]) == (0.0, 0.0)
    assert obs["grad_norm_cv"] == pytest.approx(0.5) and obs["log10_steps"] == pytest.approx(1.0)


def test_each_reference_loss_is_its_own():
    """Later in a run the first, best and previous values differ, and each feature reads its own one (in the test
    above, at epoch 2, the first and the previous losses are the same values)."""
    fb = FeatureBuilder(total_epochs=10, initial_lr=0.1, optimizer="adam")
    # val: 2.0 (first), 1.0 (best), 1.5 (previous); train: 3.0 (first), 2.0, 1.6 (previous); grad norm 2.0 first
    for epoch, (train, val, norm) in enumerate([(3.0, 2.0, 2.0), (2.0, 1.0, 4.0), (1.6, 1.5, 8.0)], start=1):
        fb.observe(epoch=epoch, lr=0.1, train_loss=train, val_loss=val, stats=StepStats(10, norm, 0.1, 0.0, 1e-3, 0.0))
    obs = dict(zip(FEATURE_NAMES, fb.observe(epoch=4, lr=0.1, train_loss=1.2, val_loss=1.8,
                                            stats=StepStats(10, 6.0, 0.1, 0.0, 1e-3, 0.0))))
    want = {"log_train_rel_first": math.log(1.2 / 3.0) / 2, "log_val_rel_first": math.log(1.8 / 2.0) / 2,
            "log_val_rel_best": 2 * math.log(1.8 / 1.0), "log_val_over_train": math.log(1.8 / 1.2),
            "dlog_train": 5 * math.log(1.2 / 1.6), "dlog_val": 5 * math.log(1.8 / 1.5),
            "log_grad_norm_rel_first": math.log(6.0 / 2.0) / 2}
    assert {k: obs[k] for k in want} == pytest.approx(want, rel=1e-6)
    assert (fb.last_val, fb.best_before_last, fb.best_val) == (1.8, 1.0, 1.0)  # what the safety rule reads


def test_hook_state_round_trip_keeps_the_sampling_schedule():
    """A 640-step epoch sets sparse sampling (every 40th norm, a probe every 160 steps); a restored hook keeps it."""
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=0.01)
    hook = StepStatsHook(opt)
    for _ in range(640):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    hook.collect()
    w2 = torch.nn.Parameter(torch.ones(4))
    hook2 = StepStatsHook(torch.optim.SGD([w2], lr=0.01))
    hook2.load_state_dict(hook.state_dict())
    assert (hook2._norm_every, hook2._probe_every) == (hook._norm_every, hook._probe_every) == (40, 160)
