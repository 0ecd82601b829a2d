"""Config layering, validation and the output-dir guard (utils/config.py)."""

from __future__ import annotations

import pytest
import yaml

from utils.config import ConfigError, check_output_dir, effective_lr, load_config, parse_overrides, save_config


def test_defaults_load_and_cli_overrides_win(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("epochs: 5\noptim:\n  blr: 2.0e-4\n")
    cfg = load_config(exp, ["optim.blr=3e-4", "in_domains=[s2_rgb, elevation]", "max_steps=null",
                            "optim.clip_grad=1", "wandb.tags=[a, b]", "data.resize=true"])
    assert cfg["epochs"] == 5
    assert cfg["optim"]["blr"] == pytest.approx(3e-4) and isinstance(cfg["optim"]["blr"], float)
    assert cfg["in_domains"] == ["s2_rgb", "elevation"]
    assert cfg["max_steps"] is None
    assert cfg["optim"]["clip_grad"] == 1
    assert cfg["wandb"]["tags"] == ["a", "b"] and cfg["data"]["resize"] is True
    assert cfg["optim"]["weight_decay"] == 0.05  # untouched defaults stay


def test_unknown_key_names_key_and_file(tmp_path):
    exp = tmp_path / "bad.yaml"
    exp.write_text("optim:\n  clip_loss: true\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'optim\.clip_loss'"):
        load_config(exp)
    with pytest.raises(ConfigError, match=r"command line.*'nonsense'"):
        load_config(None, ["nonsense=1"])


def test_wrong_type_names_key_and_file(tmp_path):
    exp = tmp_path / "typo.yaml"
    exp.write_text("batch_size: many\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*'batch_size' expects int, got str"):
        load_config(exp)
    with pytest.raises(ConfigError, match=r"'data\.resize' expects bool"):
        load_config(None, ["data.resize=1"])
    with pytest.raises(ConfigError, match="section"):
        load_config(None, ["optim=3"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])


def test_union_keys_accept_their_types():
    cfg = load_config(None, ["masking.alphas=[1.0, 0.5]", "model.preset={dim: 32, depth: 2, heads: 2}"])
    assert cfg["masking"]["alphas"] == [1.0, 0.5]
    assert cfg["model"]["preset"] == {"dim": 32, "depth": 2, "heads": 2}


def test_effective_lr_is_derived_not_stored():
    cfg = load_config(None, ["batch_size=128", "accum_steps=1", "optim.blr=1e-4"])
    assert effective_lr(cfg, world_size=4) == pytest.approx(2e-4)
    assert "lr" not in cfg["optim"]


def test_output_dir_of_another_run_is_refused(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    save_config(cfg, tmp_path)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == cfg
    check_output_dir(cfg, tmp_path)  # the same run: fine
    check_output_dir(load_config(None, [f"output_dir={tmp_path}", "max_steps=7", "num_workers=0"]), tmp_path)
    other = load_config(None, [f"output_dir={tmp_path}", "optim.blr=5e-4"])
    with pytest.raises(ConfigError, match=r"another run.*optim\.blr"):
        check_output_dir(other, tmp_path)
    check_output_dir(load_config(None, [f"output_dir={tmp_path}", "optim.blr=5e-4", "resume_anyway=true"]), tmp_path)


def test_user_errors_print_one_line_and_exit_2(capsys, monkeypatch):
    from utils.checkpoint import CheckpointError
    from utils.config import user_errors

    monkeypatch.delenv("MULTIMAE_TRACEBACK", raising=False)
    for err in (ConfigError("cfg.yaml: unknown key 'optim.bl'"), KeyError("unknown domain 'depth'"),
                CheckpointError("ckpt.pth is not a pretraining checkpoint")):
        with pytest.raises(SystemExit) as exit_info, user_errors():
            raise err
        assert exit_info.value.code == 2
        first = capsys.readouterr().err.splitlines()[0]
        assert first.startswith("error: ") and "Traceback" not in first
        assert str(err.args[0]) in first
    with pytest.raises(RuntimeError, match="bug"), user_errors():  # not a user error: the traceback stays
        raise RuntimeError("bug")
    monkeypatch.setenv("MULTIMAE_TRACEBACK", "1")
    with pytest.raises(ConfigError), user_errors():
        raise ConfigError("x")
