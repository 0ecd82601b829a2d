"""Configuration: ``cfgs/defaults.yaml`` <- experiment YAML <- command-line ``key=value`` items.

The layering follows DINOv2 (a complete defaults file, small override files, a dotlist on the
command line) and the validation follows nanoGPT's rule that unknown keys are errors: every key
must exist in the defaults, and a value must have the default's type (an int is accepted where
a float is expected; a key whose default is ``null`` accepts any type). A few keys accept more
than one type; they are listed in ``UNION_KEYS``; a few hold free mappings (``MAPPING_KEYS``). Counts,
intervals, fractions, epochs and rates must lie in the ranges of ``VALUE_RULES`` (the one table of them), and a
key written twice in one YAML mapping is an error (PyYAML would keep the last silently). Several experiment
files merge in order (a recipe written once, a task file holding only its task). Each pretraining objective has
a section named after it (``multimae``, ...); only the chosen ``objective``'s section may be set.
:func:`migrate_config` reads configs written before the objective sections existed.

The resolved config is a plain nested ``dict`` of YAML types. Values derived from it (the
learning rate, the number of steps) are computed by functions here and never written back into
the user's keys, so ``config.yaml`` and checkpoints hold exactly what the user asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

__all__ = [
    "DEFAULTS_PATH",
    "UNION_KEYS",
    "MAPPING_KEYS",
    "RUN_ONLY_KEYS",
    "ConfigError",
    "Rule",
    "VALUE_RULES",
    "check_value",
    "load_config",
    "merge_config",
    "parse_overrides",
    "build_arg_parser",
    "config_from_args",
    "effective_lr",
    "total_batch_size",
    "save_config",
    "check_output_dir",
    "migrate_config",
    "check_output_path",
]

_HERE = Path(__file__).resolve().parent  # an installed package has its copy in utils/cfgs/ (see pyproject.toml)
DEFAULTS_PATH = (_HERE if (_HERE / "cfgs" / "defaults.yaml").is_file() else _HERE.parent) / "cfgs" / "defaults.yaml"

#: Keys whose value may take any of several types (dotted key -> accepted types).
UNION_KEYS: dict[str, tuple[type, ...]] = {
    "multimae.masking.alphas": (float, int, list),  # one Dirichlet concentration, or one per in_domain
    "model.preset": (str, dict),  # a preset name, or a dict of encoder sizes {dim, depth, heads}
}

#: Keys whose value is a free mapping: a file or the command line adds or replaces entries, any names.
MAPPING_KEYS = frozenset({"model.patch_sizes", "model.ffn_options", "multimae.loss.per_domain"})

#: Keys that may change between a run and its resumption without making it "another run": they
#: steer how a run executes or reports, not what it computes (``max_steps`` only moves the stop).
RUN_ONLY_KEYS = frozenset({
    "output_dir", "resume", "resume_anyway", "max_steps", "num_workers", "device", "save_every_steps",
    "log_every_steps", "keep_every_epochs", "compile", "data.pin_memory", "data.max_bad_rows", "vis", "wandb",
})


class ConfigError(ValueError):
    """A config file or command-line item is invalid; the message names the key and its source."""


@dataclass(frozen=True)
class Rule:
    """The values a numeric (or list) config key may take.

    Attributes:
        low, high: Bounds (None: unbounded on that side).
        low_open, high_open: Exclude the bound itself (``(0, 1]`` is ``Rule(0, 1, low_open=True)``).
        nullable: ``null`` is allowed (e.g. ``max_steps: null`` = no cap).
        min_items, max_items: For list values: the number of items; the bounds then apply to each
            numeric item.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False
    min_items: int | None = None
    max_items: int | None = None

    def describe(self) -> str:
        """The allowed range in words, e.g. ``>= 1``, ``in (0, 1]``, ``a list of >= 1 items``."""
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = ""
        if self.min_items is not None or self.max_items is not None:
            n = (f"{self.min_items}" if self.min_items == self.max_items
                 else f">= {self.min_items}" if self.max_items is None else f"{self.min_items}-{self.max_items}")
            text = f"a list of {n} items" + (f", each {text}" if text else "")
        return text + (" (or null)" if self.nullable else "")

    def _number_ok(self, v: Any) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:  # v != v: NaN
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return not (self.high is not None and (v >= self.high if self.high_open else v > self.high))

    def allows(self, value: Any) -> bool:
        """True when ``value`` satisfies the rule (strings and other types are left to the type check)."""
        if value is None:
            return self.nullable
        if isinstance(value, list):
            if (self.min_items is not None and len(value) < self.min_items) or \
                    (self.max_items is not None and len(value) > self.max_items):
                return False
            return all(self._number_ok(v) for v in value if isinstance(v, (int, float)) or v is None) \
                if self.low is not None or self.high is not None else True
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return self._number_ok(value)
        return True


#: Ranges of every config key that has one; keys may be ``fnmatch`` patterns (``objectives.*.weight``)
#: so that sections with user-chosen names can share a rule. A new key with a range gets a line here.
VALUE_RULES: dict[str, Rule] = {
    # run
    "epochs": Rule(1),
    "max_steps": Rule(1, nullable=True),
    "batch_size": Rule(1),
    "accum_steps": Rule(1),
    "num_workers": Rule(0),
    "save_every_steps": Rule(1),
    "keep_every_epochs": Rule(1),
    "log_every_steps": Rule(1),
    "max_nonfinite_steps": Rule(1),
    # domains
    "in_domains": Rule(min_items=1),
    # data
    "data.input_size": Rule(1),
    "data.hflip": Rule(0, 1),
    "data.max_bad_rows": Rule(0),
    # model
    "model.patch_size": Rule(1),
    "model.num_global_tokens": Rule(1),
    "model.drop_path": Rule(0, 1, high_open=True),
    "model.class_embed_dim": Rule(1),
    "model.mlp_ratio": Rule(0, low_open=True),
    "model.gsd": Rule(0, low_open=True),
    "model.pos_embed_grid": Rule(1, nullable=True),
    "model.kv_groups": Rule(1, nullable=True),
    # objective multimae
    "multimae.out_domains": Rule(min_items=1),
    "multimae.decoder.dim": Rule(1),
    "multimae.decoder.depth": Rule(0),
    "multimae.decoder.heads": Rule(1),
    "multimae.masking.num_encoded_tokens": Rule(1),
    "multimae.masking.alphas": Rule(0, low_open=True, min_items=1),
    # objective moe_mae
    "moe_mae.mask_ratio": Rule(0, 1, low_open=True, high_open=True),
    "moe_mae.loss.visible_weight": Rule(0),
    "moe_mae.loss.balance_weight": Rule(0),
    "moe_mae.decoder.dim": Rule(1),
    "moe_mae.decoder.depth": Rule(1),
    "moe_mae.decoder.heads": Rule(1),
    "moe_mae.decoder.kv_groups": Rule(1, nullable=True),
    # optimizer and schedule
    "optim.blr": Rule(0, low_open=True),
    "optim.min_lr": Rule(0),
    "optim.warmup_epochs": Rule(0),
    "optim.weight_decay": Rule(0),
    "optim.betas": Rule(0, 1, high_open=True, min_items=2, max_items=2),
    "optim.eps": Rule(0, low_open=True),
    "optim.clip_grad": Rule(0, low_open=True, nullable=True),
    "optim.layer_decay": Rule(0, 1, low_open=True, nullable=True),
    # pictures
    "vis.every_epochs": Rule(0),
    "vis.num_samples": Rule(1),
    # fine-tuning
    "finetune.label_fraction": Rule(0, 1, low_open=True),
    "finetune.knn_k": Rule(1),
    "finetune.knn_temperature": Rule(0, low_open=True),
    "finetune.eval_every_epochs": Rule(1),
    "finetune.probe_blr": Rule(0, low_open=True),
    "finetune.probe_momentum": Rule(0, 1, high_open=True),
    "finetune.probe_weight_decay": Rule(0),
    "finetune.logistic_max_iter": Rule(1),
    "finetune.embedding_map_samples": Rule(0),
    "finetune.scratch_layer_decay": Rule(0, 1, low_open=True, nullable=True),
    "finetune.patch_size": Rule(1, nullable=True),
}


def _rule_for(key: str) -> Rule | None:
    rule = VALUE_RULES.get(key)
    if rule is None:
        for pattern, candidate in VALUE_RULES.items():
            if "*" in pattern and fnmatch.fnmatchcase(key, pattern):
                return candidate
    return rule


def check_value(key: str, value: Any, source: str) -> Any:
    """Return ``value`` if it satisfies the rule of ``key`` in :data:`VALUE_RULES` (or ``key`` has none).

    Raises:
        ConfigError: one line naming the source, the key, the allowed range and the value.
    """
    rule = _rule_for(key)
    if rule is not None and not rule.allows(value):
        raise ConfigError(f"{source}: key {key!r} must be {rule.describe()}, got "
                          f"{'null' if value is None else repr(value)}")
    return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_type(key: str, default: Any, value: Any, source: str) -> Any:
    """Return ``value`` if its type matches ``default``'s (ints promoted to float), else raise."""
    if value is None or default is None:
        return value
    allowed = UNION_KEYS.get(key)
    if allowed is not None:
        if isinstance(value, allowed) and not isinstance(value, bool):
            return value
        expected = " or ".join(t.__name__ for t in allowed)
    elif isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
        expected = type(default).__name__
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    elif isinstance(default, float) and isinstance(value, str) and _is_float(value):
        return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
    elif isinstance(value, type(default)):
        return value
    else:
        expected = type(default).__name__
    raise ConfigError(f"{source}: key {key!r} expects {expected}, got {_type_name(value)} ({value!r})")


def merge_config(base: dict, override: dict, source: str, _prefix: str = "") -> dict:
    """Return a copy of ``base`` with ``override`` merged in, validating keys and types.

    Args:
        base: The config so far (its keys define what exists).
        override: Nested dict of new values.
        source: Where ``override`` comes from (a file path or ``"command line"``), used in errors.

    Raises:
        ConfigError: a key of ``override`` is not in ``base``, or a value has the wrong type.
    """
    out = copy.deepcopy(base)
    if not isinstance(override, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at {_prefix or 'top level'}, got {override!r}")
    for key, value in override.items():
        dotted = f"{_prefix}{key}"
        if key not in base:
            raise ConfigError(f"{source}: unknown key {dotted!r} (not in {DEFAULTS_PATH.name})")
        default = base[key]
        if dotted in MAPPING_KEYS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key {dotted!r} expects a mapping, got {_type_name(value)} ({value!r})")
            out[key] = {**default, **value}
        elif isinstance(default, dict) and dotted not in UNION_KEYS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key {dotted!r} is a section; set its sub-keys, e.g. {dotted}.x=...")
            out[key] = merge_config(default, value, source, f"{dotted}.")
        else:
            out[key] = check_value(dotted, _check_type(dotted, default, value, source), source)
    return out


def _duplicate_key(node: yaml.Node, prefix: str = "") -> tuple[str, int, int] | None:
    """The first key written twice in one mapping of a composed YAML document: (dotted key, line, line)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                name, line = key_node.value, key_node.start_mark.line + 1
                if name in seen:
                    return f"{prefix}{name}", seen[name], line
                seen[name] = line
                found = _duplicate_key(value_node, f"{prefix}{name}.")
                if found:
                    return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _duplicate_key(item, prefix)
            if found:
                return found
    return None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        text = path.read_text()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not a text file ({err})") from None
    duplicate = _duplicate_key(node) if node is not None else None
    if duplicate:
        raise ConfigError(f"config file {path}: key {duplicate[0]!r} is set twice (lines {duplicate[1]} and "
                          f"{duplicate[2]}); keep one")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def parse_overrides(items: Iterable[str]) -> dict:
    """Turn ``["optim.blr=2e-4", "in_domains=[s2_rgb, elevation]"]`` into a nested dict.

    Values are parsed as YAML, so lists, ``null``, ``true``/``false`` and numbers work
    (``1e-4`` without a dot, a string in YAML 1.1, is accepted where a float is expected).

    Raises:
        ConfigError: an item has no ``=`` or an empty key.
    """
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"command line: expected key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: {key!r} sets a sub-key of a key that is also set directly")
        node[parts[-1]] = value
    return out


def _objective_sections() -> tuple[str, ...]:
    from multimae.objectives import OBJECTIVES  # torch is imported only when a config is resolved

    return tuple(OBJECTIVES)


def _changed_keys(raw, default, prefix: str) -> list[str]:
    """Dotted keys of ``raw`` whose value differs from ``default`` (a resolved config restates defaults)."""
    if isinstance(raw, dict) and isinstance(default, dict):
        out = []
        for key, value in raw.items():
            out += _changed_keys(value, default.get(key), f"{prefix}.{key}")
        return out
    return [] if raw == default else [prefix]


def check_objective_sections(cfg: dict, layers: list[tuple[str, dict]], defaults: dict | None = None) -> None:
    """Refuse settings of an objective other than ``cfg["objective"]``.

    A layer may restate another objective's defaults (a resolved ``config.yaml`` holds every section); a value
    that differs from the default is a setting.

    Args:
        cfg: The merged config.
        layers: ``(source, raw override dict)`` of every file and the command line, in merge order.
        defaults: The defaults the layers were merged into (None: any key of another section counts).

    Raises:
        ConfigError: ``objective`` is not registered (lists the choices), or a layer sets a key of another
            objective's section (names the key, its source and the chosen objective).
    """
    sections = _objective_sections()
    if cfg.get("objective") not in sections:
        raise ConfigError(f"key 'objective': unknown objective {cfg.get('objective')!r}; choose one of "
                          f"{', '.join(sections)}")
    for source, raw in layers:
        for key in raw:
            if key not in sections or key == cfg["objective"]:
                continue
            changed = _changed_keys(raw[key], (defaults or {}).get(key, object()), key)
            if changed:
                raise ConfigError(f"{source}: key {changed[0]} belongs to objective {key!r}, but this config "
                                  f"trains objective {cfg['objective']!r} (set objective={key} or drop the key)")


def load_config(paths: str | Path | Iterable[str | Path] | None = None, overrides: Iterable[str] = (),
                defaults: str | Path = DEFAULTS_PATH) -> dict:
    """Resolve a config: defaults, then each experiment file of ``paths`` in order, then command-line items.

    Args:
        paths: Experiment YAML file(s) holding only the keys they change (or None); later files win.
        overrides: ``key=value`` items, nested keys with dots.
        defaults: The defaults file that defines every key.

    Returns:
        The resolved config as a nested dict of plain YAML types.

    Raises:
        ConfigError: a file is missing or invalid, a key is unknown, a value has the wrong type, or a key
            belongs to another objective than ``objective``.
    """
    cfg = defaults_cfg = _read_yaml(Path(defaults))
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    layers = [(str(path), _read_yaml(Path(path))) for path in paths]
    layers.append(("command line", parse_overrides(overrides)))
    for source, raw in layers:
        cfg = merge_config(cfg, raw, source)
    check_objective_sections(cfg, layers, defaults_cfg)
    return cfg


def build_arg_parser(description: str) -> argparse.ArgumentParser:
    """The shared command line of the ``run_*.py`` scripts: ``--config FILE [--summary] key=value ...``."""
    parser = argparse.ArgumentParser(description=description,
                                     epilog="Every key and its default: cfgs/defaults.yaml")
    parser.add_argument("--config", type=Path, action="append", default=None,
                        help="experiment YAML (overrides of the defaults); repeat to merge several files in order")
    parser.add_argument("--summary", action="store_true", help="print the model summary and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.blr=2e-4")
    return parser


def config_from_args(args: argparse.Namespace) -> dict:
    """Resolve the config named by parsed ``build_arg_parser`` arguments."""
    return load_config(args.config, args.overrides)


_WORKER_ERROR = re.compile(r"^Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def _worker_message(msg: str) -> str:
    """The original message of an error a DataLoader worker raised (torch re-raises it wrapped in
    "Caught X in DataLoader worker process N" and the worker's traceback)."""
    match = _WORKER_ERROR.match(msg)
    if not match:
        return msg
    lines = msg.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(rf"^([\w.]+\.)?{match.group(1)}: ", line)]
    if not starts:
        return msg
    text = "\n".join(lines[starts[-1]:])
    return text.split(": ", 1)[1]


@contextlib.contextmanager
def user_errors():
    """Turn errors about the user's input into one ``error: ...`` line on stderr and exit status 2.

    The errors the framework raises for a bad config, data file, domain name or checkpoint
    (``ConfigError``, ``FileNotFoundError``, ``KeyError``, ``ValueError`` and the checkpoint /
    non-finite-loss errors, which are ``RuntimeError`` subclasses named in ``kinds``) already name
    the file and key; a traceback adds nothing for the user. So do other ``OSError``s that carry a
    file name (permission denied, a file where a folder should be). An error raised inside a
    DataLoader worker is reported with its own message. ``MULTIMAE_TRACEBACK=1`` re-raises them.
    """
    kinds = ("CheckpointError", "NonFiniteLossError")
    try:
        yield
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        unnamed_os = isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.filename is None
        wrapped = isinstance(err, RuntimeError) and type(err).__name__ not in kinds
        if os.environ.get("MULTIMAE_TRACEBACK") or wrapped or unnamed_os:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {_worker_message(str(msg))}\n(MULTIMAE_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)


def total_batch_size(cfg: dict, world_size: int) -> int:
    """Samples per optimizer step over all processes: ``batch_size * accum_steps * world_size``."""
    return cfg["batch_size"] * cfg["accum_steps"] * world_size


def effective_lr(cfg: dict, world_size: int) -> float:
    """Peak learning rate ``optim.blr * total_batch / 256`` (the MAE / MultiMAE linear scaling rule)."""
    return cfg["optim"]["blr"] * total_batch_size(cfg, world_size) / 256


def save_config(cfg: dict, output_dir: str | Path) -> Path:
    """Write the resolved config to ``<output_dir>/config.yaml`` (atomically) and return the path."""
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    tmp.replace(path)
    return path


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where nested dicts ``a`` and ``b`` differ, skipping ``RUN_ONLY_KEYS``."""
    if prefix.rstrip(".") in RUN_ONLY_KEYS:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def check_output_path(output_dir: str | Path) -> None:
    """Check that ``output_dir`` is (or can become) a writable folder: no file in its place or above it.

    Raises:
        ConfigError: ``output_dir`` or one of its parents is a file, or the nearest existing folder is
            not writable (one line naming the path).
    """
    out = Path(output_dir)
    for path in (out, *out.parents):
        if not path.exists():
            continue
        if not path.is_dir():
            where = "" if path == out else f" (in output_dir {out})"
            raise ConfigError(f"config key 'output_dir': {path} is a file, not a folder{where}")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"config key 'output_dir': cannot write into {path}")
        return


def check_output_dir(cfg: dict, output_dir: str | Path) -> None:
    """Refuse to write into a folder that holds another run's ``config.yaml``, or into a file.

    A run is "another run" when any key outside ``RUN_ONLY_KEYS`` differs. Re-running the same
    command therefore passes (and resumes); ``resume_anyway=true`` accepts a changed config.

    Raises:
        ConfigError: ``output_dir`` is not a writable folder (:func:`check_output_path`); the configs
            differ and ``resume_anyway`` is false (the message lists the keys).
    """
    check_output_path(output_dir)
    path = Path(output_dir) / "config.yaml"
    if not path.is_file() or cfg.get("resume_anyway"):
        return
    if not any(Path(output_dir).glob("checkpoint-*.pth")):
        return  # a run that stopped before its first checkpoint: nothing to protect, the corrected run starts
    old = migrate_config(yaml.safe_load(path.read_text()) or {})
    changed = _diff(old, cfg)
    if changed:
        shown = ", ".join(f"{k} ({_get(old, k)!r} -> {_get(cfg, k)!r})" for k in changed[:8])
        raise ConfigError(
            f"{path} belongs to another run; differing keys: {shown}. Choose another output_dir, "
            "or pass resume_anyway=true to continue that run with this config."
        )


def _get(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


#: Keys of configs written before the objective sections: old dotted key -> new dotted key.
_V1_KEYS = {
    "out_domains": "multimae.out_domains",
    "model.decoder_dim": "multimae.decoder.dim",
    "model.decoder_depth": "multimae.decoder.depth",
    "model.decoder_heads": "multimae.decoder.heads",
    "masking.num_encoded_tokens": "multimae.masking.num_encoded_tokens",
    "masking.alphas": "multimae.masking.alphas",
    "masking.sample_domains_uniformly": "multimae.masking.sample_domains_uniformly",
    "loss.weighting": "multimae.loss.weighting",
    "loss.loss_on_unmasked": "multimae.loss.on_unmasked",
}


def migrate_config(cfg: dict) -> dict:
    """A config written before the objective sections (no ``objective`` key), with its keys moved.

    ``out_domains``, ``masking.*``, ``loss.*`` and ``model.decoder_*`` move into the ``multimae`` section
    (:data:`_V1_KEYS`), ``objective: multimae`` is added, the per-domain losses and normalised-pixel targets
    those configs took from the domain registry are written out as the registry had them, and keys added
    since take their defaults. A config that has ``objective`` is returned unchanged.

    Raises:
        ConfigError: the old config holds a key that neither exists now nor moved.
    """
    if "objective" in cfg or not cfg:
        return cfg
    out = copy.deepcopy(cfg)
    for old, new in _V1_KEYS.items():
        node, parts = out, old.split(".")
        for part in parts[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if not isinstance(node, dict) or parts[-1] not in node:
            continue
        value = node.pop(parts[-1])
        target = out
        for part in new.split(".")[:-1]:
            target = target.setdefault(part, {})
        target[new.split(".")[-1]] = value
    for section in ("masking", "loss"):
        if out.get(section) == {}:
            del out[section]
    loss = out.setdefault("multimae", {}).setdefault("loss", {})
    loss.setdefault("per_domain", {"elevation": "l1", "slope": "l1", "canopy_height": "l1"})
    loss.setdefault("norm_pix", ["s2_rgb_normpix"])
    out["objective"] = "multimae"
    return merge_config(_read_yaml(DEFAULTS_PATH), out, "a config written before objective sections existed")
