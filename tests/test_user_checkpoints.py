"""Users' networks in: ``--model module:factory`` from the cwd, with arguments, and
weights files as training scripts save them (wrappers, DataParallel prefixes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from csqcfs_deploy.cli import main
from csqcfs_deploy.errors import InputFileError, UsageError
from csqcfs_deploy.ir import InputEncoding, load_graph
from csqcfs_deploy.train.checkpoint import (
    ModelConfig,
    load_user_model,
    read_state_dict,
    save_checkpoint,
)
from csqcfs_deploy.train.user_model import parse_model_spec

CLI = Path(sys.executable).with_name("csqcfs-deploy")

# A small network in the style of the QCFS reference code bases: a factory with
# num_classes and L, an `IF`-like activation with a learnable `thresh`, levels `L`
# and a time-step switch `T`. The CLI tests use the tool's own CSQCFS (act="cs").
MYNET = textwrap.dedent('''
    import torch
    from torch import nn
    from csqcfs_deploy.train.activations import CSQCFS


    class IF(nn.Module):
        def __init__(self, T=0, L=8, thresh=4.0):
            super().__init__()
            self.thresh = nn.Parameter(torch.tensor([thresh]))
            self.L = L
            self.T = T

        def forward(self, x):
            y = torch.clamp(x / self.thresh, 0, 1) * self.L + 0.5
            y = y + (torch.floor(y) - y).detach()
            return y / self.L * self.thresh


    class Block(nn.Module):
        def __init__(self, channels, L, act):
            super().__init__()
            self.bn = nn.BatchNorm2d(channels)
            self.act = CSQCFS(channels, L) if act == "cs" else IF(L=L)

        def forward(self, x):
            return self.act(self.bn(x))


    class Net(nn.Module):
        def __init__(self, num_classes=10, L=4, act="cs"):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.block = Block(4, L, act)
            self.pool = nn.AvgPool2d(2)
            self.fc = nn.Linear(4 * 4 * 4, num_classes)

        def forward(self, x):
            return self.fc(self.pool(self.block(self.stem(x))).flatten(1))


    def build(num_classes=10, L=4, act="cs"):
        return Net(num_classes, L, act)


    def broken(num_classes=10):
        raise ValueError("L must be a power of two\\nsecond line")


    def not_a_module():
        return {"weights": 1}
''')


@pytest.fixture
def netdir(tmp_path: Path) -> Path:
    (tmp_path / "mynet.py").write_text(MYNET)
    return tmp_path


def _spec(netdir: Path, call: str = "build") -> str:
    """The path form, so in-process tests never share a cached module."""
    return f"{netdir / 'mynet.py'}:{call}"


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(CLI), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def test_cli_imports_from_cwd_with_json_args_and_dataparallel_weights(netdir: Path) -> None:
    torch.manual_seed(0)
    model = load_user_model(_spec(netdir), None, '{"num_classes": 10, "L": 2}')
    wrapped = nn.DataParallel(model)
    assert all(k.startswith("module.") for k in wrapped.state_dict())
    torch.save(wrapped.state_dict(), netdir / "w.pt")
    proc = _cli(["convert", "--model", "mynet:build", "--model-args",
                 '{"num_classes": 10, "L": 2}', "--weights", "w.pt", "--dataset", "digits",
                 "--profile", "int16", "--no-check", "--json", "-o", "out.ifg"], netdir)
    assert proc.returncode == 0, proc.stderr
    graph = load_graph(netdir / "out.ifg")
    assert graph.meta.profile == "int16" and len(graph.if_layers) == 1


def test_wrong_class_count_is_refused_by_the_weights(netdir: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(load_user_model(_spec(netdir), None).state_dict(), netdir / "w.pt")
    code = main(["convert", "--model", _spec(netdir, "build(num_classes=5, L=2)"), "--weights",
                 str(netdir / "w.pt"), "--no-check", "-o", str(netdir / "bad.ifg")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "2 shape mismatches (fc.weight: file 10x64, model 5x64, fc.bias: file 10, model 5)" \
        in err
    assert not (netdir / "bad.ifg").exists()


def test_hostile_inline_arguments_are_refused_and_not_run(netdir: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    marker = netdir / "pwned"
    for spec in (f"mynet:build(__import__('os').system('touch {marker}'))",
                 f"mynet:build(L=open('{marker}', 'w'))",
                 "mynet:build(*[1])", "mynet:build(**{'L': 2})", "mynet:build(1)(2)",
                 "mynet:build(1).eval", "mynet:build(num_classes="):
        code = main(["convert", "--model", spec, "--no-check", "-o", str(netdir / "x.ifg")])
        err = capsys.readouterr().err
        assert code == UsageError.exit_code, (spec, err)
        assert err.startswith("error: --model ") and err.count("\n") == 1, err
    assert not marker.exists() and not (netdir / "x.ifg").exists()
    with pytest.raises(UsageError, match=r"argument 1 .*__import__.* is not a literal"):
        parse_model_spec("mynet:build(__import__('os').system('echo hi'))")


def test_inline_and_json_arguments_are_parsed_and_merged() -> None:
    spec = parse_model_spec("pkg.mynets:vgg16(100, L=8, widths=[64, 128], name='x', bn=True)")
    assert (spec.target, spec.factory) == ("pkg.mynets", "vgg16")
    assert spec.args == (100,)
    assert spec.kwargs == {"L": 8, "widths": [64, 128], "name": "x", "bn": True}
    merged = parse_model_spec("m:f(L=-2)", '{"num_classes": 100, "scale": 0.5}')
    assert merged.kwargs == {"L": -2, "num_classes": 100, "scale": 0.5}
    path_form = parse_model_spec("models/my.nets.py:f")
    assert (path_form.target, path_form.factory, path_form.kwargs) == ("models/my.nets.py", "f", {})
    for spec_text, args, needle in [
        ("m:f(L=2)", '{"L": 4}', "'L' is given both inline in --model and in --model-args"),
        ("m:f", "[1, 2]", "must be a JSON object"),
        ("m:f", "{num_classes: 1}", "--model-args is not valid JSON"),
        ("m:f", "{'num_classes': 1}", "--model-args is not valid JSON"),
        ("mynets", None, "must be MODULE:FACTORY"),
        ("m:9f", None, "is not a Python name"),
        ("m:f(L=x)", None, "argument L=x is not a literal"),
    ]:
        with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace("[", r"\[")):
            parse_model_spec(spec_text, args)


def test_factory_problems_are_one_line_usage_errors(netdir: Path) -> None:
    cases = {
        "build(num_classes=10, depth=3)": "does not take the arguments given (got an unexpected "
                                          "keyword argument 'depth'); its signature is build(",
        "missing": "has no callable 'missing'",
        "broken": "factory " + str(netdir / "mynet.py") + ":broken failed: ValueError: "
                  "L must be a power of two",
        "not_a_module": "returned dict, not a torch.nn.Module",
    }
    for call, needle in cases.items():
        with pytest.raises(UsageError) as info:
            load_user_model(_spec(netdir, call), None)
        assert needle in str(info.value) and "second line" not in str(info.value), info.value
    with pytest.raises(UsageError, match="cannot import model module 'no_such_mod_h1'"):
        load_user_model("no_such_mod_h1:build", None)
    with pytest.raises(UsageError, match="model file not found"):
        load_user_model(f"{netdir / 'nope.py'}:build", None)


def test_module_form_uses_cwd_and_restores_sys_path(netdir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (netdir / "cwdnet_h1.py").write_text(MYNET)
    monkeypatch.chdir(netdir)
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if p not in ("", ".") and Path(p).resolve() != netdir])
    before = list(sys.path)
    model = load_user_model("cwdnet_h1:build(3, L=2)", None)
    assert model.fc.out_features == 3 and model.block.act.t == 2
    assert sys.path == before
    monkeypatch.delitem(sys.modules, "cwdnet_h1")


def _if_net(netdir: Path) -> nn.Module:
    torch.manual_seed(1)
    return load_user_model(_spec(netdir, "build(act='if')"), None)


def test_wrapped_and_prefixed_state_dicts_load(netdir: Path) -> None:
    source = _if_net(netdir)
    with torch.no_grad():
        source.block.act.thresh.fill_(2.5)
    state = source.state_dict()
    # an optimizer's state_dict() as SGD writes it (creating one imports torch._dynamo: ~6 s)
    opt = {"state": {0: {"momentum_buffer": torch.zeros(4, 1, 3, 3)}},
           "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1, 2, 3, 4, 5]}]}
    files = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 7},
        "model": {"model": state, "optimizer": opt},
        "net": {"net": state, "epoch": 3, "acc": 91.5},
        "dataparallel": nn.DataParallel(source).state_dict(),
        "nested dataparallel": {"net": nn.DataParallel(nn.DataParallel(source)).state_dict()},
        # what torch.compile(model).state_dict() gives (torch.compile itself takes ~7 s
        # to import), here saved from a DataParallel-wrapped compiled model
        "compiled": {f"module._orig_mod.{k}": v for k, v in state.items()},
    }
    assert all(k.startswith("module.module.") for k in files["nested dataparallel"]["net"])
    for name, payload in files.items():
        path = netdir / f"{name.replace(' ', '_')}.pt"
        torch.save(payload, path)
        model = load_user_model(_spec(netdir, "build(act='if')"), path)
        for key, value in state.items():
            assert torch.equal(model.state_dict()[key], value), (name, key)
        assert not model.training
    own = netdir / "own.pt"
    config = ModelConfig(arch="user", levels=4, phi=0.5, num_classes=10, input_shape=(1, 8, 8),
                         encoding=InputEncoding(raw_max=16.0, mean=(0.0,), std=(1.0,)),
                         dataset="digits")
    save_checkpoint(own, source, config)
    assert set(read_state_dict(own)) == set(state)
    loaded = load_user_model(_spec(netdir, "build(act='if')"), own)
    assert float(loaded.block.act.thresh.detach()) == 2.5


def _mismatch(netdir: Path, state: dict[str, torch.Tensor]) -> str:
    path = netdir / "bad.pt"
    torch.save(state, path)
    with pytest.raises(InputFileError) as info:
        load_user_model(_spec(netdir, "build(act='if')"), path)
    text = str(info.value)
    assert len(text) < 600 and "\n" not in text, text
    return text


def test_mismatch_messages_are_short_with_counts_and_hints(netdir: Path) -> None:
    state = _if_net(netdir).state_dict()
    n = len(state)
    text = _mismatch(netdir, {f"backbone.{k}": v for k, v in state.items()})
    assert f"{n} missing keys (stem.weight, stem.bias, block.bn.weight, ...)" in text
    assert f"{n} unexpected keys (backbone.stem.weight," in text
    assert "every key in the file starts with 'backbone.'" in text and "remove that prefix" in text
    text = _mismatch(netdir, {k.removeprefix("block."): v for k, v in state.items()})
    assert "the model's missing keys start with 'block.' (e.g. 'block.bn.weight' for " \
        "'bn.weight'): add that prefix" in text
    assert "add that prefix" in text
    text = _mismatch(netdir, {k.replace("block.", "layer1."): v for k, v in state.items()})
    assert "start with 'layer1.' where the model's missing keys start with 'block.'" in text
    # the QCFS code bases' old names: 'up' for 'thresh', 'relu.up' for 'act.thresh'
    old = {k.replace("act.thresh", "act.up"): v for k, v in state.items()}
    text = _mismatch(netdir, old)
    assert "1 missing key (block.act.thresh)" in text and "1 unexpected key (block.act.up)" in text
    assert "'up' in the file, 'thresh' in the model" in text
    old = {k.replace("act.thresh", "relu.up"): v for k, v in state.items()}
    assert "last two names: 'relu.up' in the file, 'act.thresh' in the model" in _mismatch(
        netdir, old)
    wrong = dict(state)
    wrong["fc.weight"] = torch.zeros(3, 64)
    wrong["fc.bias"] = torch.zeros(3)
    del wrong["stem.bias"]
    text = _mismatch(netdir, wrong)
    assert "1 missing key (stem.bias)" in text and "unexpected" not in text
    assert "2 shape mismatches (fc.weight: file 3x64, model 10x64, fc.bias: file 3, model 10)" \
        in text
    huge = {f"encoder.layers.{i}.attention.{j}.weight": torch.zeros(1)
            for i in range(200) for j in range(5)}
    text = _mismatch(netdir, huge)
    assert f"{n} missing keys" in text and "1000 unexpected keys" in text


def test_unreadable_weights_files_name_the_problem(netdir: Path) -> None:
    cases: dict[str, tuple[object, str]] = {
        "pickled_module": ({"model": nn.Linear(2, 2)}, "holds a pickled Python object "
                           "(torch.nn.modules.linear.Linear)"),
        "no_state": ({"epoch": 3, "acc": 0.5, "optimizer": {}}, "holds a dict with keys "
                     "'epoch', 'acc', 'optimizer' and no state dict in it"),
        "mixed": ({"fc.weight": torch.zeros(1), "fc.bias": torch.zeros(1), "epoch": 3},
                  "'epoch' is a int, not a tensor"),
        "list": ([torch.zeros(1)], "is not a state dict (it holds a list)"),
    }
    for name, (payload, needle) in cases.items():
        path = netdir / f"{name}.pt"
        torch.save(payload, path)
        with pytest.raises(InputFileError) as info:
            load_user_model(_spec(netdir), path)
        assert needle in str(info.value) and len(str(info.value)) < 400, info.value


def test_model_args_without_model_and_mismatch_exit_code(netdir: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    code = main(["convert", str(netdir / "w.pt"), "--model-args", "{}", "-o",
                 str(netdir / "o.ifg")])
    assert code == UsageError.exit_code and "--model-args needs --model" in capsys.readouterr().err
    torch.save({"net": {"x.weight": torch.zeros(2)}, "epoch": 3}, netdir / "w.pt")
    code = main(["convert", "--model", _spec(netdir), "--model-args", json.dumps({"L": 2}),
                 "--weights", str(netdir / "w.pt"), "--no-check", "-o", str(netdir / "o.ifg")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "1 unexpected key (x.weight)" in err
    assert not (netdir / "o.ifg").exists()
