"""Demo architectures, reproducible training, architecture references and the model cache."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.fx
from safetensors.torch import save_file

from suture.merge import demo, zoo
from suture.merge.data import load_dataset
from suture.merge.errors import InputError, UntrustedCodeError
from suture.merge.evaluate import evaluate

TINY = (64, 32, 10)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    # The session's base temp dir is shared by every test module, so the demo pair is trained once.
    return tmp_path_factory.getbasetemp() / "suture-demo-zoo"


def _train_tiny(seed: int, epochs: int = 2, max_items: int | None = 400) -> torch.nn.Module:
    model = zoo.build_seeded("suture.merge.zoo:mlp", seed, widths=TINY)
    demo.train(model, load_dataset("sklearn:digits", split="train", max_items=max_items), epochs=epochs, seed=seed)
    return model


def test_training_is_bit_reproducible_and_seed_dependent():
    before = torch.random.get_rng_state()
    a1, a2, b = _train_tiny(5), _train_tiny(5), _train_tiny(6)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG stream is untouched
    sa, sa2, sb = a1.state_dict(), a2.state_dict(), b.state_dict()
    assert list(sa) == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    assert all(torch.equal(sa[k], sa2[k]) for k in sa)
    assert not any(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.get_num_threads() >= 1


def test_training_learns():
    test = load_dataset("sklearn:digits")
    untrained = zoo.build_seeded("mlp", 0, widths=TINY)
    trained = _train_tiny(0, epochs=8, max_items=None)
    assert evaluate(untrained, test)["accuracy"] < 0.3
    assert evaluate(trained, test)["accuracy"] > 0.85


def test_target_accuracy_stops_early():
    model = zoo.build_seeded("mlp", 0, widths=TINY)
    history = demo.train(
        model, load_dataset("sklearn:digits", split="train"), epochs=50, seed=0,
        eval_data=load_dataset("sklearn:digits"), target_accuracy=0.9,
    )
    assert len(history) < 50 and history[-1]["eval_accuracy"] >= 0.9
    assert all(row["eval_accuracy"] < 0.9 for row in history[:-1])


def test_architectures_are_fx_traceable_and_accept_flat_or_image_inputs():
    net = zoo.resnet_small(width=4)
    flat, image = torch.randn(5, 64), torch.randn(5, 1, 8, 8)
    net.eval()
    assert net(flat).shape == (5, 10) and torch.allclose(net(image), net(image.reshape(5, 64)))
    assert net(image).shape == (5, 10)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 9
    traced = torch.fx.symbolic_trace(net)
    assert torch.allclose(traced(flat), net(flat))
    assert any(n.op == "call_function" and "add" in str(n.target) for n in traced.graph.nodes)  # residual adds
    mlp = zoo.mlp(TINY)
    assert torch.allclose(torch.fx.symbolic_trace(mlp)(flat), mlp(flat))
    with pytest.raises(ValueError, match="widths"):
        zoo.mlp((64,))


def test_build_architecture_references():
    assert isinstance(zoo.build_architecture("mlp", widths=TINY), zoo.MLP)
    net = zoo.build_architecture("suture.merge.zoo:resnet_small", width=4, num_classes=3)
    assert net.fc.out_features == 3
    assert isinstance(zoo.build_architecture("suture.merge.zoo:MLP", widths=TINY), zoo.MLP)
    assert zoo.ARCHITECTURES["resnet"] is zoo.resnet_small


@pytest.mark.parametrize(
    ("ref", "kwargs", "fragment"),
    [
        ("suture.merge.zoo:ARCH_KEY", {}, "not a callable"),
        ("suture.merge.zoo:nothing_here", {}, "has no attribute 'nothing_here'"),
        ("suture.merge.no_such_module:mlp", {}, "cannot import module 'suture.merge.no_such_module'"),
        ("collections:OrderedDict", {}, "expected a torch.nn.Module"),
        ("mlp", {"depth": 3}, "calling the factory"),
        ("transformer", {}, "expected 'package.module:factory'"),
        ("", {}, "expected 'package.module:factory'"),
    ],
)
def test_build_architecture_errors(ref, kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        zoo.build_architecture(ref, **kwargs)


def test_save_and_load_module_round_trip(tmp_path):
    model = _train_tiny(1, epochs=1)
    out = zoo.save_module(model, tmp_path / "m", "suture.merge.zoo:mlp", {"widths": TINY}, {"note": "x"})
    config = json.loads((out / "config.json").read_text())
    assert config["suture_architecture"] == {"factory": "suture.merge.zoo:mlp", "kwargs": {"widths": list(TINY)}}
    assert config["note"] == "x"
    loaded = zoo.load_module(out)
    x = torch.randn(4, 64)
    assert not loaded.training and torch.equal(loaded(x), model(x))
    # A sharded folder (index + shards) rebuilds the same module.
    state = model.state_dict()
    shard = tmp_path / "sharded"
    shard.mkdir()
    names = list(state)
    save_file({k: state[k] for k in names[:2]}, str(shard / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in names[2:]}, str(shard / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors" for i, k in enumerate(names)}
    (shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (shard / "config.json").write_text(json.dumps(config))
    assert torch.equal(zoo.load_module(shard)(x), model(x))


def test_load_module_errors(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        zoo.load_module(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InputError, match="no 'suture_architecture' entry"):
        zoo.load_module(tmp_path)
    model = zoo.mlp(TINY)
    zoo.save_module(model, tmp_path / "m", "suture.merge.zoo:mlp", {"widths": TINY})
    with pytest.raises(InputError, match=r"missing \['layers.0.weight'.*shape mismatches \['layers.0.bias \(7,\) vs \(32,\)'\]"):
        zoo.load_module(tmp_path / "m", state={"layers.0.bias": torch.zeros(7)})


def test_demo_models_cache_and_rebuild(tmp_path):
    first = demo.demo_models(tmp_path, "mlp", seeds=(1, 2), epochs=1, widths=[64, 16, 10])
    assert [p.name.split("-")[:2] for p in first] == [["mlp", "seed1"], ["mlp", "seed2"]]
    assert all(len(p.name.split("-")) == 3 for p in first)  # non-default settings get a hash suffix
    config = json.loads((first[0] / "config.json").read_text())
    assert config["suture_architecture"] == {"factory": "suture.merge.zoo:mlp", "kwargs": {"widths": [64, 16, 10]}}
    assert config["suture_demo"]["recipe"]["seed"] == 1 and config["suture_demo"]["recipe"]["epochs"] == 1
    stamp = os.stat(first[0] / "model.safetensors").st_mtime_ns
    again = demo.demo_models(tmp_path, "mlp", seeds=(1, 2), epochs=1, widths=[64, 16, 10])
    assert again == first and os.stat(first[0] / "model.safetensors").st_mtime_ns == stamp
    a, b = (zoo.load_module(p) for p in first)
    acc = evaluate(a, load_dataset("sklearn:digits"))["accuracy"]
    assert abs(acc - config["suture_demo"]["test"]["digits"]["accuracy"]) < 1e-9
    assert not torch.equal(a.layers[0].weight, b.layers[0].weight)
    assert not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(InputError, match="demo kind 'gpt'"):
        demo.demo_models(tmp_path, "gpt")


def test_real_demo_pair_reaches_target_accuracy(demo_cache):
    paths = demo.demo_models(demo_cache, "mlp")
    assert [p.name for p in paths] == ["mlp-seed1", "mlp-seed2"]
    test = load_dataset("sklearn:digits")
    for path in paths:
        config = json.loads((path / "config.json").read_text())
        assert config["suture_architecture"]["kwargs"] == {"widths": [64, 512, 512, 512, 10]}
        assert config["suture_demo"]["recipe"]["epochs"] == 60
        assert evaluate(zoo.load_module(path), test)["accuracy"] >= 0.97


def test_demo_resnet_trains(tmp_path):
    paths = demo.demo_models(tmp_path, "resnet", seeds=(1,), epochs=4)  # the default is 20 epochs (≈0.99)
    model = zoo.load_module(paths[0])
    assert isinstance(model, zoo.ResNetSmall)
    assert evaluate(model, load_dataset("sklearn:digits?shape=image"))["accuracy"] >= 0.95


def test_demo_finetunes_specialise(tmp_path):
    folders = demo.demo_finetunes(tmp_path)
    assert set(folders) == {"base", "ft_0_4", "ft_5_9"}
    low, high = load_dataset("sklearn:digits?classes=0-4"), load_dataset("sklearn:digits?classes=5-9")
    base, ft_low, ft_high = (zoo.load_module(folders[k]) for k in ("base", "ft_0_4", "ft_5_9"))
    assert evaluate(ft_low, low)["accuracy"] > max(0.95, evaluate(base, low)["accuracy"])
    assert evaluate(ft_high, high)["accuracy"] > max(0.95, evaluate(base, high)["accuracy"])
    assert evaluate(ft_low, high)["accuracy"] < 0.5 and evaluate(ft_high, low)["accuracy"] < 0.5  # forgetting
    # Both fine-tunes start from the base: same architecture, weights moved away from it.
    sb, sl = zoo.load_state(folders["base"]), zoo.load_state(folders["ft_0_4"])
    assert sb.keys() == sl.keys() and not torch.equal(sb["layers.0.weight"], sl["layers.0.weight"])
    config = json.loads((folders["ft_0_4"] / "config.json").read_text())
    assert config["suture_demo"]["recipe"]["data"] == "sklearn:digits?classes=0-4"


@pytest.mark.parametrize("factory", ["suture.merge.zoo:mlp", "merge.zoo:mlp", "merge.zoo:resnet_small", "mlp"])
def test_saved_factory_references_keep_loading(tmp_path, factory):
    """Configs saved before and after the namespace move (and the factories/demo split) rebuild the same module."""
    kwargs = {"widths": list(TINY)} if "resnet" not in factory else {"width": 4, "num_classes": 3}
    model = zoo.build_seeded(factory, 0, **kwargs)
    folder = zoo.save_module(model, tmp_path / "m", factory, kwargs)
    # no trust opt-in: the old spelling is recognised as the zoo's own factory, not foreign code
    loaded = zoo.load_module(folder)
    assert type(loaded) is type(model) and type(model).__module__ == "suture.merge.zoo"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert zoo.canonical_factory(factory).startswith("suture.merge.zoo:") or factory == "mlp"
    # training lives in suture.merge.demo; the factories module stays importable without it
    assert not hasattr(zoo, "train") and not hasattr(zoo, "demo_models") and callable(demo.train)


def test_foreign_factory_in_a_saved_config_still_needs_trust(tmp_path):
    zoo.save_module(zoo.mlp(TINY), tmp_path / "m", "tests._user_models:small_cnn", {})
    with pytest.raises(UntrustedCodeError, match="tests._user_models:small_cnn"):
        zoo.load_module(tmp_path / "m")
