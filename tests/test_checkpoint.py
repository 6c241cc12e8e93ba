"""The pickle-free policy file: round trip, and refusal of everything else without running it."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from controller import FEATURE_NAMES, N_FEATURES, PolicyNet, load_policy, read_metadata, save_policy
from controller.actions import ActionConfig
from controller.checkpoint import FORMAT_VERSION, METADATA_KEY, default_policy_path


def make_net(seed: int = 0) -> PolicyNet:
    torch.manual_seed(seed)
    return PolicyNet(N_FEATURES, hidden=(16, 8), obs_mean=torch.randn(N_FEATURES), obs_std=torch.rand(N_FEATURES) + 0.5)


def test_round_trip_keeps_outputs_and_metadata(tmp_path):
    net = make_net()
    cfg = ActionConfig(scale=0.5, max_ratio=32.0)
    path = save_policy(tmp_path / "p.safetensors", net, action_config=cfg, description="test", training={"steps": 3})
    loaded = load_policy(path)
    assert not loaded.training  # in eval mode, as documented
    obs = torch.randn(64, N_FEATURES) * 3
    torch.testing.assert_close(loaded(obs), net(obs))
    assert loaded.action_config == cfg
    assert loaded.metadata["training"] == {"steps": 3}
    assert read_metadata(path)["feature_names"] == list(FEATURE_NAMES)
    assert read_metadata(path)["description"] == "test" and read_metadata(path)["placeholder"] is False
    assert path.stat().st_size < 64 * 1024
    marked = save_policy(tmp_path / "placeholder.safetensors", net, placeholder=True)  # the label users are shown
    assert load_policy(marked).metadata["placeholder"] is True


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_act_agrees_with_forward_and_follows_weight_changes(activation):
    """act() (NumPy, one observation) and forward() (torch, batched) are one computation."""
    torch.manual_seed(0)
    net = PolicyNet(N_FEATURES, hidden=(16, 8), activation=activation, obs_mean=torch.randn(N_FEATURES),
                    obs_std=torch.rand(N_FEATURES) + 0.5)
    with torch.no_grad():
        net.action_net.weight.mul_(20.0)  # reach the clip at ±1 too
    obs = torch.randn(500, N_FEATURES) * 5
    want = net(obs).detach()[:, 0]
    got = torch.tensor([net.act(o.numpy()) for o in obs])
    # float32 rounding, summed in another order: ~1e-7 of the pre-activations (here up to ~20)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want.abs().max() == 1.0 and want.abs().min() < 0.5
    net.load_state_dict({k: -v for k, v in net.state_dict().items()})  # in place: the cache follows
    assert net.act(obs[0].numpy()) == pytest.approx(float(net(obs[:1]).detach()[0, 0]), abs=1e-5)
    with torch.no_grad():  # an in-place update by hand (an optimizer step would do the same)
        net.mlp[0].weight.mul_(0.1)
        net.obs_mean.add_(1.0)
    assert net.act(obs[1].numpy()) == pytest.approx(float(net(obs[1:2]).detach()[0, 0]), abs=1e-5)
    net.double()  # no float32 CPU weights: the torch path
    assert net.act(obs[0].numpy()) == pytest.approx(float(net(obs[:1].double()).detach()[0, 0]), abs=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_act_on_cuda_weights_takes_the_torch_path():
    torch.manual_seed(0)
    net = PolicyNet(N_FEATURES, hidden=(16, 8))
    obs = torch.randn(N_FEATURES).numpy()
    assert net.to("cuda").act(obs) == pytest.approx(net.cpu().act(obs), abs=1e-5)


@pytest.mark.parametrize("hidden", [(), (8,), (16, 8, 4)])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_act_agrees_with_forward_at_any_depth(hidden, activation):
    """act() folds the normalisation into the first layer (the output layer when there is none): any depth."""
    torch.manual_seed(1)
    net = PolicyNet(N_FEATURES, hidden=hidden, activation=activation, obs_mean=torch.randn(N_FEATURES),
                    obs_std=torch.rand(N_FEATURES) + 0.5)
    obs = torch.randn(200, N_FEATURES) * 5
    want = net(obs).detach()[:, 0]
    torch.testing.assert_close(torch.tensor([net.act(o.numpy()) for o in obs]), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor([net.act(o.tolist()) for o in obs]), want, atol=1e-5, rtol=1e-5)


def test_any_header_length_loads(tmp_path):
    """The first byte of a safetensors file is its header length: 0x80 there is not a pickle."""
    net = make_net()
    first_bytes = set()
    for pad in range(64):
        path = save_policy(tmp_path / f"p{pad}.safetensors", net, description="x" * (8 * pad))
        first_bytes.add(path.read_bytes()[0])
        load_policy(path)
    assert len(first_bytes) >= 32


def test_bundled_default_policy_loads():
    net = load_policy()
    assert net.metadata["feature_names"] == list(FEATURE_NAMES)
    assert net.metadata["placeholder"] is False  # a trained policy ships, not the placeholder
    assert default_policy_path().is_file()


class _Payload:
    """Unpickling this runs os.system and creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):  # 0 and 1 have no PROTO opcode to tell them by
        evil.write_bytes(pickle.dumps(_Payload(marker), protocol=protocol))
        with pytest.raises(ValueError, match="looks like a Python pickle"):
            load_policy(evil)
    # torch.save writes a zip with a pickle inside: refused as a zip, never unpickled
    torch_file = tmp_path / "evil.pt"
    torch.save({"x": _Payload(marker)}, torch_file)
    with pytest.raises(ValueError, match=r"zip archive \(a torch.save file or a Stable-Baselines3 .zip\?\)"):
        load_policy(torch_file)
    assert not marker.exists()


def test_an_empty_policy_path_is_named(tmp_path):
    for empty in ("", "  "):
        with pytest.raises(ValueError, match="policy path is empty: give a policy file, or None"):
            load_policy(empty)


def test_sb3_zip_is_refused(tmp_path):
    path = tmp_path / "model.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data", "{}")
        z.writestr("policy.pth", b"\x80\x02")
    with pytest.raises(ValueError, match="Stable-Baselines3 .zip"):
        load_policy(path)


def test_truncated_file_is_refused(tmp_path):
    good = save_policy(tmp_path / "good.safetensors", make_net())
    data = good.read_bytes()
    for cut in (4, 100, len(data) - 10):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated|corrupt|larger than the file"):
            load_policy(bad)


def _rewrite_metadata(src: Path, dst: Path, **changes) -> Path:
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"][METADATA_KEY])
    meta.update(changes)
    header["__metadata__"][METADATA_KEY] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return dst


def test_other_features_or_newer_format_are_refused(tmp_path):
    good = save_policy(tmp_path / "good.safetensors", make_net())
    load_policy(_rewrite_metadata(good, tmp_path / "same.safetensors"))  # the rewrite itself is harmless
    renamed = [*FEATURE_NAMES[:-1], "something_else"]
    with pytest.raises(ValueError, match=r"other features.*missing \['log10_steps'\].*unknown \['something_else'\]"):
        load_policy(_rewrite_metadata(good, tmp_path / "feat.safetensors", feature_names=renamed))
    with pytest.raises(ValueError, match=f"format_version {FORMAT_VERSION + 1} is newer"):
        load_policy(_rewrite_metadata(good, tmp_path / "new.safetensors", format_version=FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match="unknown action map kind"):
        load_policy(_rewrite_metadata(good, tmp_path / "act.safetensors", action_map={"kind": "linear"}))
    swapped = list(FEATURE_NAMES)
    swapped[7], swapped[8] = swapped[8], swapped[7]  # the same names in another order: other inputs
    with pytest.raises(ValueError, match="other features.*order must match"):
        load_policy(_rewrite_metadata(good, tmp_path / "order.safetensors", feature_names=swapped))


def test_a_file_missing_a_tensor_is_refused(tmp_path):
    """Without obs_std the net would load its default normalisation and act on unnormalised inputs."""
    from safetensors.torch import load, save

    good = save_policy(tmp_path / "good.safetensors", make_net())
    tensors = load(good.read_bytes())
    tensors.pop("obs_std")
    (tmp_path / "m.safetensors").write_bytes(save(tensors, metadata=read_metadata_raw(good)))
    with pytest.raises(ValueError, match=r"weights do not match the declared net shape \(obs_std: \[None\] in the "
                                         r"file, \[\(19,\)\] declared\)"):
        load_policy(tmp_path / "m.safetensors")


def read_metadata_raw(path: Path) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` of ``path``, as stored."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])["__metadata__"]


def test_plain_safetensors_without_our_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="without 'lrcontrol' metadata"):
        load_policy(path)


def test_missing_file_is_a_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_policy(tmp_path / "nope.safetensors")


def _with_header(src: Path, dst: Path, edit) -> Path:
    """``src`` with its safetensors header (parsed JSON) replaced by ``edit(header)`` (bytes or a JSON value)."""
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    new = edit(json.loads(data[8 : 8 + n]))
    raw = new if isinstance(new, bytes) else json.dumps(new).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return dst


def _set_metadata(raw: str):
    def edit(header):
        header["__metadata__"][METADATA_KEY] = raw
        return header
    return edit


def _declare(net: dict | None = None, **changes):
    """An edit of the policy metadata: top-level ``changes``, and ``net`` merged into its "net" entry."""
    def edit(header):
        meta = json.loads(header["__metadata__"][METADATA_KEY])
        meta.update(changes)
        meta["net"].update(net or {})
        header["__metadata__"][METADATA_KEY] = json.dumps(meta)
        return header
    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda header: b"{not json", "header is not valid JSON"),
        (lambda header: [1, 2, 3], "header is not a JSON object"),
        (_set_metadata("{not json"), "metadata is not valid JSON"),
        (_set_metadata(json.dumps({"format": "something-else", "format_version": 1})), "metadata format is"),
        (_set_metadata(json.dumps({"format": "lrcontrol-policy", "format_version": "1"})), "invalid format_version"),
        (_set_metadata(json.dumps({"format": "lrcontrol-policy", "format_version": True})), "invalid format_version"),
        (_declare(net={"hidden": [16, 16]}), "weights do not match the declared net shape"),
        (_declare(net={"hidden": [10**6, 10**6]}), "weights do not match the declared net shape"),  # never built
        (_declare(net={"hidden": [10**12, 10**12]}), "invalid metadata .*overflowed"),
        (_declare(net={"n_features": 5}), "a net of 5 inputs for 19 feature names"),
        (_declare(net={"hidden": [-1, 8]}), "hidden layer widths must be positive"),
        (_declare(net={"obs_clip": -1.0}), "obs_clip must be a positive"),
        (_declare(net={"n_features": "19"}), "n_features must be a positive int"),
        (_declare(action_map=[]), "must be JSON objects"),
        (_declare(feature_names=5), "feature_names is 5, not a list"),
        (lambda header: {**header, "__metadata__": [1]}, "'__metadata__' is not a JSON object"),
        (lambda header: {**header, "__metadata__": {METADATA_KEY: 5}}, "metadata is not a JSON string"),
    ],
    ids=["header-json", "header-list", "metadata-json", "format", "format-version", "format-version-bool", "shape",
         "huge-shape", "overflowing-shape", "five-inputs", "negative-width", "negative-clip", "string-features",
         "action-map-list", "feature-names-int", "metadata-list", "metadata-int"],
)
def test_corrupt_header_or_metadata_is_refused(tmp_path, edit, message):
    good = save_policy(tmp_path / "good.safetensors", make_net())
    load_policy(_with_header(good, tmp_path / "same.safetensors", lambda header: header))  # the rewrite is harmless
    with pytest.raises(ValueError, match=message):
        load_policy(_with_header(good, tmp_path / "bad.safetensors", edit))


def test_zero_normalisation_std_is_refused(tmp_path):
    net = make_net()
    with torch.no_grad():
        net.obs_std[3] = 0.0  # (obs - mean) / 0: every action would be NaN, read as "hold" without a word
    with pytest.raises(ValueError, match="standard deviation <= 0"):
        load_policy(save_policy(tmp_path / "std.safetensors", net))


def test_directory_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        load_policy(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_weights_that_are_not_real_floats_are_refused(tmp_path, dtype):
    """load_state_dict casts them into the float32 net: int weights truncated, bools as 0/1, complex numbers less
    their imaginary part: another policy, loaded without a word."""
    from safetensors.torch import load, save

    good = save_policy(tmp_path / "good.safetensors", make_net())
    tensors = load(good.read_bytes())
    tensors["mlp.0.weight"] = tensors["mlp.0.weight"].to(dtype)
    (tmp_path / "t.safetensors").write_bytes(save(tensors, metadata=read_metadata_raw(good)))
    with pytest.raises(ValueError, match=rf"weights must be real floating-point tensors, got mlp.0.weight \({dtype}\)"):
        load_policy(tmp_path / "t.safetensors")
    tensors["mlp.0.weight"] = load(good.read_bytes())["mlp.0.weight"].double()  # another float width loads
    (tmp_path / "f.safetensors").write_bytes(save(tensors, metadata=read_metadata_raw(good)))
    load_policy(tmp_path / "f.safetensors")


def test_non_finite_weights_are_refused(tmp_path):
    net = make_net()
    with torch.no_grad():
        net.mlp[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite weights"):
        load_policy(save_policy(tmp_path / "nan.safetensors", net))
