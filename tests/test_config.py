"""Config layering, validation and the output-dir guard (utils/config.py)."""

from __future__ import annotations

import os
import re

import pytest
import torch
import yaml

from utils.config import (DEFAULTS_PATH, VALUE_RULES, ConfigError, Rule, check_output_dir, effective_lr, load_config,
                          migrate_config, parse_overrides, save_config)


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
    check_output_dir(other, tmp_path)  # no checkpoint yet (a run that stopped early): the corrected run may start
    (tmp_path / "checkpoint-last.pth").write_bytes(b"")
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
def test_a_key_set_twice_in_a_yaml_file_is_an_error(tmp_path):
    exp = tmp_path / "twice.yaml"
    exp.write_text("epochs: 2\nbatch_size: 4\nepochs: 3\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: key 'epochs' is set twice \(lines 1 and 3\)"):
        load_config(exp)
    exp.write_text("optim:\n  blr: 1.0e-3\n  min_lr: 0.0\n  blr: 5.0\nepochs: 2\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: key 'optim.blr' is set twice \(lines 2 and 4\)"):
        load_config(exp)
    exp.write_text("optim:\n  blr: 1.0e-3\ndata:\n  blr: 2\n")  # the same name in two sections is two keys
    with pytest.raises(ConfigError, match=r"unknown key 'data.blr'"):
        load_config(exp)


def test_the_range_table_covers_real_keys_and_the_defaults_satisfy_it():
    defaults = yaml.safe_load(DEFAULTS_PATH.read_text())
    for key, rule in VALUE_RULES.items():
        node = defaults
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"VALUE_RULES key {key!r} is not in defaults.yaml"
            node = node[part]
        assert rule.allows(node), f"default {key}={node!r} breaks its own rule {rule.describe()}"
    assert Rule(0, 1, low_open=True).describe() == "in (0, 1]" and Rule(1).describe() == ">= 1"


@pytest.mark.parametrize("item, message", [
    ("epochs=-1", "'epochs' must be >= 1, got -1"),
    ("epochs=0", "'epochs' must be >= 1, got 0"),
    ("epochs=null", "'epochs' must be >= 1, got null"),
    ("batch_size=0", "'batch_size' must be >= 1"),
    ("accum_steps=0", "'accum_steps' must be >= 1"),
    ("log_every_steps=0", "'log_every_steps' must be >= 1"),
    ("save_every_steps=0", "'save_every_steps' must be >= 1"),
    ("keep_every_epochs=0", "'keep_every_epochs' must be >= 1"),
    ("max_steps=0", "'max_steps' must be >= 1 (or null), got 0"),
    ("num_workers=-2", "'num_workers' must be >= 0"),
    ("vis.num_samples=0", "'vis.num_samples' must be >= 1"),
    ("optim.warmup_epochs=-1", "'optim.warmup_epochs' must be >= 0, got -1.0"),
    ("optim.blr=0", "'optim.blr' must be > 0"),
    ("optim.betas=[0.9, 1.5]", "'optim.betas' must be a list of 2 items, each in [0, 1), got [0.9, 1.5]"),
    ("optim.betas=[0.9]", "'optim.betas' must be a list of 2 items"),
    ("optim.layer_decay=1.5", "'optim.layer_decay' must be in (0, 1] (or null)"),
    ("finetune.label_fraction=2.0", "'finetune.label_fraction' must be in (0, 1], got 2.0"),
    ("finetune.label_fraction=0", "'finetune.label_fraction' must be in (0, 1], got 0.0"),
    ("data.hflip=1.5", "'data.hflip' must be in [0, 1], got 1.5"),
    ("data.max_bad_rows=-1", "'data.max_bad_rows' must be >= 0"),
    ("model.drop_path=1.0", "'model.drop_path' must be in [0, 1)"),
    ("multimae.masking.num_encoded_tokens=0", "'multimae.masking.num_encoded_tokens' must be >= 1"),
    ("multimae.masking.alphas=[1.0, -1]", "'multimae.masking.alphas' must be a list of >= 1 items, each > 0"),
    ("optim.eps=.nan", "'optim.eps' must be > 0, got nan"),
    ("multimae.out_domains=[]", "'multimae.out_domains' must be a list of >= 1 items, got []"),
])
def test_each_out_of_range_value_is_one_error_naming_key_and_source(item, message, tmp_path):
    with pytest.raises(ConfigError, match=r"^command line: key " + re.escape(message)):
        load_config(None, [item])
    key, value = item.split("=", 1)
    node = f"{key.split('.')[-1]}: {value}"
    for part in reversed(key.split(".")[:-1]):
        node = f"{part}:\n  " + node.replace("\n", "\n  ")
    exp = tmp_path / "exp.yaml"
    exp.write_text(node + "\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(exp))}: key " + re.escape(message)):
        load_config(exp)


def test_range_rules_take_patterns_for_sections_with_chosen_names(monkeypatch):
    monkeypatch.delitem(VALUE_RULES, "optim.min_lr")  # an exact key wins over a pattern
    monkeypatch.setitem(VALUE_RULES, "optim.*_lr", Rule(0, 1e-2))
    with pytest.raises(ConfigError, match=r"'optim.min_lr' must be in \[0, 0.01\], got 0.5"):
        load_config(None, ["optim.min_lr=0.5"])


def test_output_dir_that_is_a_file_is_one_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        cfg = load_config(None, [f"output_dir={out}"])
        with pytest.raises(ConfigError, match=rf"'output_dir': {tmp_path / 'afile'} is a file, not a folder"):
            check_output_dir(cfg, out)
    check_output_dir(load_config(None, [f"output_dir={tmp_path / 'new' / 'run'}"]), tmp_path / "new" / "run")


class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise ValueError(f"/data/x.h5: row {i} is broken\nsecond line of the message")


def test_user_errors_report_a_worker_error_with_its_own_message(capsys, monkeypatch):
    from utils.config import user_errors

    monkeypatch.delenv("MULTIMAE_TRACEBACK", raising=False)
    with pytest.raises(SystemExit), user_errors():
        next(iter(torch.utils.data.DataLoader(_Broken(), batch_size=2, num_workers=1)))
    err = capsys.readouterr().err
    assert err.startswith("error: /data/x.h5: row 0 is broken\nsecond line of the message\n(MULTIMAE")
    assert "Traceback" not in err and "DataLoader worker" not in err
    with pytest.raises(SystemExit), user_errors():
        open(os.path.join(os.sep, "proc", "no-such-dir", "f"), "w")  # an OSError naming its file: one line
    assert capsys.readouterr().err.startswith("error: [Errno 2] No such file or directory: '/proc/no-such-dir/f'")
    with pytest.raises(OSError), user_errors():  # an OSError without a file name is not the user's: traceback
        raise OSError("socket closed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_config_error():
    from utils.dist import init_distributed

    with pytest.raises(ConfigError, match="config key 'device' is 'cuda' but no CUDA device is available"):
        init_distributed("cuda")
    with pytest.raises(ConfigError, match="'device' must be auto, cpu or cuda, got 'gpu'"):
        init_distributed("gpu")
