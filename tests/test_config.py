"""Config layering, validation and the output-dir guard (utils/config.py)."""

from __future__ import annotations

import pytest
import yaml

from utils.config import (ConfigError, check_output_dir, effective_lr, load_config, migrate_config, parse_overrides,
                          save_config)


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
    cfg = load_config(None, ["multimae.masking.alphas=[1.0, 0.5]", "model.preset={dim: 32, depth: 2, heads: 2}"])
    assert cfg["multimae"]["masking"]["alphas"] == [1.0, 0.5]
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


def test_several_config_files_merge_in_order(tmp_path):
    recipe, task = tmp_path / "recipe.yaml", tmp_path / "task.yaml"
    recipe.write_text("epochs: 50\noptim:\n  blr: 0.0005\n  layer_decay: 0.65\n")
    task.write_text("optim:\n  blr: 0.0001\nfinetune:\n  geobench_task: m-eurosat\n")
    cfg = load_config([recipe, task], ["epochs=7"])
    assert (cfg["epochs"], cfg["optim"]["blr"], cfg["optim"]["layer_decay"]) == (7, 0.0001, 0.65)
    assert cfg["finetune"]["geobench_task"] == "m-eurosat"
    from utils.config import build_arg_parser, config_from_args

    args = build_arg_parser("x").parse_args(["--config", str(recipe), "--config", str(task), "batch_size=3"])
    assert config_from_args(args)["optim"]["blr"] == 0.0001 and config_from_args(args)["batch_size"] == 3


def test_free_mappings_add_entries():
    cfg = load_config(None, ["model.patch_sizes={s2_atmos: 16}", "multimae.loss.per_domain={s1: l1}"])
    assert cfg["model"]["patch_sizes"] == {"s2_atmos": 16}
    assert cfg["multimae"]["loss"]["per_domain"] == {"elevation": "l1", "slope": "l1", "canopy_height": "l1", "s1": "l1"}
    with pytest.raises(ConfigError, match="'model.patch_sizes' expects a mapping"):
        load_config(None, ["model.patch_sizes=16"])


def test_objective_and_sections_of_other_objectives(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="key 'objective': unknown objective 'byol'; choose one of multimae"):
        load_config(None, ["objective=byol"])
    import utils.config as config_module

    defaults = yaml.safe_load(config_module.DEFAULTS_PATH.read_text())
    defaults["dummy"] = {"depth": 4}  # a second registered objective with its own section
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump(defaults))
    monkeypatch.setattr(config_module, "_objective_sections", lambda: ("multimae", "dummy"))
    exp = tmp_path / "exp.yaml"
    exp.write_text("dummy:\n  depth: 2\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: key dummy.depth belongs to objective 'dummy', but this config "
                                          r"trains objective 'multimae'"):
        load_config(exp, [], defaults=path)
    assert load_config(exp, ["objective=dummy"], defaults=path)["dummy"]["depth"] == 2
    restated = tmp_path / "resolved.yaml"  # a resolved config.yaml restates every section's defaults
    restated.write_text(yaml.safe_dump(load_config(None, [], defaults=path)))
    assert load_config(restated, [], defaults=path)["objective"] == "multimae"
    with pytest.raises(ConfigError, match="command line: key multimae.masking.alphas belongs to objective .multimae."):
        load_config(exp, ["objective=dummy", "multimae.masking.alphas=2.0"], defaults=path)


def test_configs_written_before_objective_sections_are_migrated():
    old = {"seed": 3, "out_domains": ["s2_rgb", "elevation"], "masking": {"num_encoded_tokens": 9, "alphas": 0.5},
           "loss": {"weighting": "uncertainty", "loss_on_unmasked": True},
           "model": {"preset": "small", "decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4}}
    new = migrate_config(old)
    mm = new["multimae"]
    assert new["objective"] == "multimae" and new["seed"] == 3 and new["model"]["preset"] == "small"
    assert mm["out_domains"] == ["s2_rgb", "elevation"] and mm["masking"]["num_encoded_tokens"] == 9
    assert mm["masking"]["alphas"] == 0.5 and mm["loss"]["weighting"] == "uncertainty" and mm["loss"]["on_unmasked"]
    assert (mm["decoder"]["dim"], mm["decoder"]["depth"], mm["decoder"]["heads"]) == (64, 1, 4)
    assert "masking" not in new and "loss" not in new and "decoder_dim" not in new["model"]
    assert mm["loss"]["per_domain"]["elevation"] == "l1"  # as the v1 registry had it
    assert migrate_config(new) is new  # already migrated
