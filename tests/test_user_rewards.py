"""A user's own reward: a plain callable works without declaring anything (differentiability is
inferred at the first gradient), and `--reward module:function` / `file.py:function` load one
from the command line."""

import json
import os
import sys
import textwrap

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tiltgen.core.reward import as_reward, evaluate_reward, reward_gradient  # noqa: E402
from tiltgen.errors import TiltgenError  # noqa: E402
from tiltgen.rewards import reward_from_spec  # noqa: E402
from tiltgen.tilt import TweedieGuidance  # noqa: E402

USER_FILE = textwrap.dedent('''
    import numpy as np
    import torch

    def mean_value(x0, cond):
        return x0.flatten(1).mean(1)

    def via_numpy(x0, cond):
        return torch.tensor(np.asarray(x0.detach()).reshape(len(x0), -1).mean(1))

    def make_scaled(scale=1.0):
        return lambda x0, cond: scale * x0.flatten(1).mean(1)

    def declared(x0):
        return -x0.flatten(1).pow(2).mean(1)
    declared.differentiable = True

    not_callable = 3
''')


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FILE)
    return path


def test_a_plain_callable_is_a_reward_without_declaring_anything():
    reward = as_reward(lambda x0, cond: x0.sum(1))
    x = torch.randn(4, 3, dtype=torch.float64)
    assert reward.differentiable and not reward.declared
    torch.testing.assert_close(reward_gradient(reward, x), torch.ones_like(x))
    TweedieGuidance(lambda x0, cond: x0.sum(1), beta=0.5)  # gradient guidance accepts it too


def test_an_undeclared_reward_without_gradient_is_found_out_at_the_first_gradient():
    numpy_reward = as_reward(lambda x0, cond: torch.tensor(x0.detach().numpy().sum(1)))
    x = torch.randn(4, 3, dtype=torch.float64)
    assert evaluate_reward(numpy_reward, x).shape == (4,)  # values alone are fine
    with pytest.raises(TiltgenError, match="gives no gradient with respect to the images.*assumed differentiable"):
        reward_gradient(numpy_reward, x)
    declared_false = as_reward(lambda x0, cond: x0.sum(1), differentiable=False)
    with pytest.raises(TiltgenError, match="needs a differentiable reward"):
        TweedieGuidance(declared_false, beta=0.5)
    with pytest.raises(TiltgenError, match="must be callable"):
        as_reward(3)


def test_spec_loads_functions_from_files_and_modules(user_file, tmp_path, monkeypatch):
    x = torch.rand(2, 3, 4, 4)
    reward = reward_from_spec(f"{user_file}:mean_value")
    assert reward.name == "my_rewards:mean_value" and reward.differentiable
    torch.testing.assert_close(reward(x, None), x.flatten(1).mean(1))
    # a factory with arguments; differentiable declared in the spec; a weight after the name
    scaled = reward_from_spec(f"{user_file}:make_scaled(scale=3)")
    torch.testing.assert_close(scaled(x, None), 3 * x.flatten(1).mean(1))
    off = reward_from_spec(f"{user_file}:via_numpy(differentiable=false)")
    assert not off.differentiable
    assert reward_from_spec(f"{user_file}:declared").differentiable  # its own attribute
    monkeypatch.syspath_prepend(str(tmp_path))
    mixed = reward_from_spec("my_rewards:mean_value:0.5,brightness:2")
    assert [w for w, _ in mixed.terms] == [0.5, 2.0] and mixed.differentiable
    assert "my_rewards" in sys.modules


@pytest.mark.parametrize("spec, message", [
    ("{dir}/missing.py:f", "does not exist"),
    ("{file}:nothing", "has no function 'nothing'"),
    ("{file}:not_callable", "not a callable reward"),
    ("{file}:make_scaled(size=2)", "unexpected keyword argument 'size'"),
    ("{file}:mean_value(differentiable=maybe)", "differentiable must be true or false"),
    ("no_such_module_here:f", "cannot be found"),
    ("{dir}/broken.py:f", "importing reward file .* failed: ZeroDivisionError"),
])
def test_bad_user_rewards_get_clear_errors(user_file, tmp_path, spec, message):
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    with pytest.raises(TiltgenError, match=message):
        reward_from_spec(spec.format(dir=tmp_path, file=user_file))


def test_cli_samples_with_a_user_reward(user_file, tmp_path, capsys):
    pytest.importorskip("diffusers")
    import diffusers_tiny as tiny

    from tiltgen.cli.main import main

    sd = tmp_path / "sd"
    tiny.tiny_sd("ddim").save_pretrained(sd)
    args = ["sample", "--model", str(sd), "--prompt", "a cat", "--n", "2", "--steps", "2", "--cfg", "1",
            "--height", "16", "--width", "16", "--no-progress", "--method", "tweedie", "--beta", "0.1"]
    assert main(args + ["--reward", f"{user_file}:mean_value", "--eval-reward", f"{user_file}:via_numpy",
                        "--out", str(tmp_path / "ok")]) == 0
    record = json.loads((tmp_path / "ok" / "sample.json").read_text())
    assert set(record["samples"][0]["terms"]) == {f"eval:{user_file}:via_numpy"}
    assert main(args + ["--reward", f"{user_file}:via_numpy", "--out", str(tmp_path / "bad")]) == 2
    assert "gives no gradient with respect to the images" in capsys.readouterr().err
