"""Compare pretraining recipes on the same data, budget, encoder size, seed and evaluation, in one command.

    python benchmarks/compare_objectives.py --config cfgs/compare/demo.yaml       # make compare
    python benchmarks/compare_objectives.py --config cfgs/compare/mmearth64_geobench.yaml

A comparison config (``cfgs/compare/*.yaml``) names:

- ``filesets``: MMEarth file sets to build first with ``tools/geotiff_to_mmearth.py`` (several ``inputs`` go into
  one file set), or existing ones (``path`` only); skipped when the file set exists;
- ``pretrain``: the shared pretraining settings: ``data`` (a file set name or a path) and ``overrides`` applied
  to every recipe (budget: steps or epochs and batch; encoder size; domains; ...);
- ``recipes``: each a ``name``, its ``config`` files (merged in order) and its own ``overrides``;
- ``tasks``: each a ``name``, fine-tuning ``config`` files, ``data``, the ``protocols`` (``knn``,
  ``linear_probe``, ``logistic``, ``finetune``), the input-domain ``subsets`` and its ``overrides``;
- ``seeds``: one run per seed; with several, cells give mean and spread and the table says which differences
  lie within the spread;
- ``isolation``: ``process`` (each recipe's pretraining in its own ``run_pretraining.py`` process, so its peak
  memory is its own) or ``inline`` (in this process: tests).

Pretraining runs through ``run_pretraining.py`` and evaluation through ``run_finetuning.py`` (their ``main``),
nothing is copied. Recorded per recipe and seed: every metric per task, protocol and input subset; pretraining
wall time, samples/s, peak memory (RSS on CPU, max allocated on GPU), trainable parameters, step cost relative to
the ``baseline_recipe``; the exact resolved configs and the code commit. Outputs in ``output_dir``:
``results.json``, ``results.md`` (the table, also printed), ``metrics.png`` (metric by recipe and task) and
``cost.png`` (quality against pretraining cost). Resumable: a finished pretraining or evaluation is not redone
when the command runs again; a failed recipe is reported in the table and does not stop the others (it is
retried on the next run). A recorded pretraining or evaluation whose config no longer matches (a changed recipe,
budget or task) is reported as failed with the first differing key, never reused: delete its folder to redo it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.checkpoint import code_commit  # noqa: E402
from utils.config import ConfigError, load_config, total_batch_size  # noqa: E402
from utils.logger import read_log  # noqa: E402

__all__ = ["load_compare_config", "run_comparison", "main"]

_TOP_KEYS = {"output_dir", "seeds", "filesets", "pretrain", "recipes", "tasks", "isolation", "baseline_recipe"}
_PROTOCOLS = ("knn", "linear_probe", "logistic", "finetune")


# ---------------------------------------------------------------------- config
def load_compare_config(path: str | Path) -> dict:
    """Read and check a comparison config (module docstring), with defaults filled in.

    Raises:
        ConfigError: an unknown or missing key, a recipe or task without a name or with a duplicate one, an
            unknown protocol, a file set or data reference that does not exist (the message names the key).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"comparison config {path} not found")
    cfg = yaml.safe_load(path.read_text()) or {}
    unknown = set(cfg) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_TOP_KEYS))}")
    for key in ("output_dir", "pretrain", "recipes", "tasks"):
        if key not in cfg:
            raise ConfigError(f"{path}: key {key!r} is missing")
    cfg.setdefault("seeds", [0])
    cfg.setdefault("filesets", {})
    cfg.setdefault("isolation", "process")
    cfg.setdefault("baseline_recipe", cfg["recipes"][0]["name"] if cfg["recipes"] else None)
    if cfg["isolation"] not in ("process", "inline"):
        raise ConfigError(f"{path}: isolation must be process or inline, got {cfg['isolation']!r}")
    if not cfg["seeds"] or not all(isinstance(s, int) for s in cfg["seeds"]):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers, got {cfg['seeds']!r}")
    for kind in ("recipes", "tasks"):
        names = [entry.get("name") for entry in cfg[kind]]
        if not names or None in names or len(set(names)) != len(names):
            raise ConfigError(f"{path}: every entry of {kind} needs a unique name, got {names}")
        for entry in cfg[kind]:
            entry["config"] = [str(REPO / c) if not Path(c).is_absolute() else c for c in entry.get("config", [])]
            entry.setdefault("overrides", [])
    for task in cfg["tasks"]:
        bad = [p for p in task.get("protocols", []) if p not in _PROTOCOLS]
        if bad or not task.get("protocols"):
            raise ConfigError(f"{path}: tasks.{task['name']}.protocols must be a non-empty list of "
                              f"{', '.join(_PROTOCOLS)}, got {task.get('protocols')}")
        task.setdefault("subsets", [None])
    if cfg["baseline_recipe"] not in [r["name"] for r in cfg["recipes"]]:
        raise ConfigError(f"{path}: baseline_recipe {cfg['baseline_recipe']!r} is not a recipe")
    cfg["pretrain"].setdefault("overrides", [])
    for ref in [cfg["pretrain"].get("data")] + [t.get("data") for t in cfg["tasks"]]:
        if ref is not None and ref not in cfg["filesets"] and not Path(ref).exists():
            raise ConfigError(f"{path}: data {ref!r} is neither a file set of 'filesets' nor an existing path")
    cfg["_path"] = str(path)
    return cfg


def _data_path(cfg: dict, ref: str | None) -> str | None:
    if ref is None:
        return None
    fileset = cfg["filesets"].get(ref)
    return str(fileset["path"]) if fileset else ref


def prepare_filesets(cfg: dict) -> None:
    """Convert every file set of ``filesets`` that does not exist yet (tools/geotiff_to_mmearth.py)."""
    from tools.geotiff_to_mmearth import convert
    from utils.data.geotiff_spec import ConversionError

    for name, fs in cfg["filesets"].items():
        out = Path(fs["path"])
        if (out / f"{out.name}.h5").is_file() or "inputs" not in fs:
            continue
        specs = [str(REPO / i["spec"]) for i in fs["inputs"]]
        srcs = [str(i["src"]) for i in fs["inputs"]]
        print(f"[compare] converting file set {name!r} into {out}", flush=True)
        try:
            summary = convert(specs, srcs, out, fs.get("tile_size", 64), progress=False)
        except ConversionError as err:
            raise ConfigError(f"filesets.{name}: {err}") from None
        print(f"[compare] {name}: {summary['num_tiles']} tiles, splits {summary['split_sizes']}", flush=True)


# ---------------------------------------------------------------------- pretraining
def _first_difference(recorded, current) -> str | None:
    """The first dotted key where ``recorded`` and ``current`` differ (compared as JSON would store them), or
    None when they are equal. A key only ``current`` has is not a difference: newer code added it, and a new
    config key defaults to the behaviour from before it existed."""

    def walk(a, b, prefix: str) -> str | None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(a):  # keys only ``b`` (the current config) has are not differences
                if k not in b:
                    return f"{prefix}{k}"
                diff = walk(a[k], b[k], f"{prefix}{k}.")
                if diff is not None:
                    return diff
            return None
        return None if a == b else (prefix.rstrip(".") or "the config")

    return walk(json.loads(json.dumps(recorded, default=str)), json.loads(json.dumps(current, default=str)), "")


def _recipe_overrides(cfg: dict, recipe: dict, seed: int, out: Path) -> list[str]:
    items = [*cfg["pretrain"]["overrides"], *recipe["overrides"], f"seed={seed}", f"output_dir={out}"]
    data = _data_path(cfg, cfg["pretrain"].get("data"))
    return items + ([f"data_path={data}"] if data else [])


def _cost(run_cfg: dict, out: Path, seconds: float) -> dict:
    """Cost figures of a finished pretraining run from its log and its model."""
    from multimae.build import build_pretraining, count_trainable

    records = [r for r in read_log(out / "log.jsonl") if "loss" in r and "samples_per_s" in r]
    rates = [r["samples_per_s"] for r in records if r["step"] > 1]  # step 1 includes the start-up
    rate = statistics.median(rates) if rates else (records[-1]["samples_per_s"] if records else float("nan"))
    peak = max((r.get("peak_mem_mb", 0.0) for r in records), default=float("nan"))
    steps = max((r["step"] for r in records), default=0)
    return {"seconds": round(seconds, 2), "steps": steps, "samples_per_s": rate, "peak_mem_mb": peak,
            "seconds_per_step": total_batch_size(run_cfg, 1) / rate if rate and rate == rate else float("nan"),
            "trainable_params": count_trainable(build_pretraining(run_cfg)),
            "final_loss": records[-1]["loss"] if records else float("nan")}


def pretrain(cfg: dict, recipe: dict, seed: int) -> dict:
    """Pretrain one recipe with one seed (or read what an earlier run recorded); never raises for the recipe's
    own failure: returns ``{"status": "failed", "error": ...}``."""
    out = Path(cfg["output_dir"]) / "recipes" / recipe["name"] / f"seed{seed}" / "pretrain"
    done = out / "compare_done.json"
    items = _recipe_overrides(cfg, recipe, seed, out)
    try:
        run_cfg = load_config(recipe["config"], items)
    except (ConfigError, ValueError, KeyError) as err:
        return {"status": "failed", "error": f"config: {err}"}
    if done.is_file():
        recorded = json.loads(done.read_text())
        changed = _first_difference(recorded.get("config"), run_cfg)
        if changed is not None:
            return {"status": "failed", "error": f"{out} was pretrained with another config ({changed} differs); "
                                                 f"delete that folder to pretrain it again"}
        return recorded
    print(f"[compare] pretraining {recipe['name']} (seed {seed}) into {out}", flush=True)
    t0 = time.perf_counter()
    if cfg["isolation"] == "process":
        command = [sys.executable, str(REPO / "run_pretraining.py")]
        for c in recipe["config"]:
            command += ["--config", c]
        proc = subprocess.run(command + items, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            error = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
            return {"status": "failed", "error": f"exit {proc.returncode}: {error}"}
    else:
        import run_pretraining

        try:
            run_pretraining.main(run_cfg)
        except Exception as err:  # noqa: BLE001 - a failed recipe is reported, the others go on
            return {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    result = {"status": "ok", "checkpoint": str(out / "checkpoint-last.pth"), "config": run_cfg,
              **_cost(run_cfg, out, time.perf_counter() - t0)}
    done.write_text(json.dumps(result, indent=1, default=str))
    return result


# ---------------------------------------------------------------------- evaluation
def evaluate(cfg: dict, recipe: dict, seed: int, task: dict, protocol: str, subset: list[str] | None,
             checkpoint: str, pretrain_config: dict | None = None) -> dict:
    """One probe of one pretrained encoder (or what an earlier run wrote); failures are returned, not raised.

    An earlier result made with another evaluation config or another pretraining config is reported as failed
    (with the first differing key), never reused."""
    import run_finetuning

    tag = "+".join(subset) if subset else "config_inputs"
    out = Path(cfg["output_dir"]) / "recipes" / recipe["name"] / f"seed{seed}" / "eval" / task["name"] / protocol / tag
    results, key_file = out / "results.json", out / "compare_key.json"
    row = {"recipe": recipe["name"], "seed": seed, "task": task["name"], "protocol": protocol,
           "inputs": subset or "config"}
    items = [*task["overrides"], f"seed={seed}", f"output_dir={out}", f"finetune.checkpoint={checkpoint}",
             f"finetune.protocol={protocol}", "finetune.grid=[]"]
    data = _data_path(cfg, task.get("data"))
    items += [f"data_path={data}"] if data else []
    items += [f"in_domains=[{', '.join(subset)}]"] if subset else []
    try:
        eval_cfg = load_config(task["config"], items)
    except (ConfigError, ValueError, KeyError) as err:
        return {**row, "status": "failed", "error": f"config: {err}"}
    # What the result depends on: the evaluation config and the pretraining it probes.
    key = {"finetune_config": eval_cfg, "pretrain_config": pretrain_config}
    if results.is_file() and key_file.is_file():
        changed = _first_difference(json.loads(key_file.read_text()), key)
        if changed is not None:
            return {**row, "status": "failed", "error": f"{out} was evaluated with another config or pretraining "
                                                        f"({changed} differs); delete that folder to evaluate again"}
    if not results.is_file():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(json.dumps(key, indent=1, default=str))
        try:
            run_finetuning.main(eval_cfg)
        except Exception as err:  # noqa: BLE001
            return {**row, "status": "failed", "error": f"{type(err).__name__}: {err}"}
    res = json.loads(results.read_text())
    split = "test" if "test" in res["metrics"] else "val"
    scalars = {k: v for k, v in res["metrics"][split].items() if isinstance(v, (int, float))}
    return {**row, "status": "ok", "split": split, "metric": res["metric"], "value": scalars.get(res["metric"]),
            "metrics": scalars, "num_train": res.get("num_train")}


# ---------------------------------------------------------------------- summary
def _mean_spread(values: list[float]) -> tuple[float, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(cfg: dict, pretraining: dict, evaluations: list[dict]) -> dict:
    """Mean and spread per (task, protocol, inputs) and recipe, cost per recipe, and which differences are noise."""
    recipes = [r["name"] for r in cfg["recipes"]]
    keys = list(dict.fromkeys((e["task"], e["protocol"], json.dumps(e["inputs"])) for e in evaluations))
    rows = []
    for task, protocol, inputs in keys:
        cells, metric = {}, None
        for name in recipes:
            got = [e for e in evaluations if (e["task"], e["protocol"], json.dumps(e["inputs"])) == (task, protocol, inputs)
                   and e["recipe"] == name]
            ok = [e for e in got if e["status"] == "ok"]
            metric = metric or next((e["metric"] for e in ok), None)
            mean, spread = _mean_spread([e["value"] for e in ok])
            cells[name] = {"mean": mean, "spread": spread, "n": len(ok),
                           "failed": [e.get("error") for e in got if e["status"] != "ok"]}
        valid = {n: c for n, c in cells.items() if c["n"] and not math.isnan(c["mean"])}
        top = max((c["mean"] for c in valid.values()), default=None)
        best = [n for n, c in valid.items() if c["mean"] == top]  # every recipe with the top mean (ties included)
        tied = []
        for n, c in valid.items():
            spreads = [s for s in (c["spread"], valid[best[0]]["spread"]) if s is not None] if best else []
            if n not in best and spreads and top - c["mean"] <= max(spreads):
                tied.append(n)
        rows.append({"task": task, "protocol": protocol, "inputs": json.loads(inputs), "metric": metric,
                     "cells": cells, "best": best, "within_spread_of_best": tied})
    cost = {}
    base = cfg["baseline_recipe"]
    base_steps = [p["seconds_per_step"] for (n, _), p in pretraining.items() if n == base and p["status"] == "ok"]
    base_step = statistics.fmean(base_steps) if base_steps else float("nan")
    for name in recipes:
        runs = [p for (n, _), p in pretraining.items() if n == name]
        ok = [p for p in runs if p["status"] == "ok"]
        entry = {"status": "ok" if ok else "failed", "errors": [p.get("error") for p in runs if p["status"] != "ok"]}
        for key in ("seconds", "samples_per_s", "peak_mem_mb", "trainable_params", "seconds_per_step", "final_loss"):
            entry[key] = _mean_spread([p[key] for p in ok])[0] if ok else float("nan")
        entry["step_cost_vs_baseline"] = entry["seconds_per_step"] / base_step if ok and base_step == base_step else float("nan")
        cost[name] = entry
    return {"rows": rows, "cost": cost}


def _fmt(cell: dict) -> str:
    if not cell["n"]:
        return "failed" if cell["failed"] else "-"
    text = f"{cell['mean']:.3f}"
    return text + (f" ± {cell['spread']:.3f}" if cell["spread"] is not None else "")


def markdown_table(cfg: dict, summary: dict) -> str:
    """The comparison as markdown: one row per (task, protocol, inputs), one column per recipe, then costs."""
    recipes = [r["name"] for r in cfg["recipes"]]
    seeds = len(cfg["seeds"])
    lines = [f"Recipes compared on the same data, budget and probes ({seeds} seed{'s' if seeds > 1 else ''}; "
             f"{'mean ± std over seeds' if seeds > 1 else 'one seed: no spread, differences may be noise'}).", "",
             "| task | protocol | inputs | metric | " + " | ".join(recipes) + " | note |",
             "|" + "---|" * (len(recipes) + 5)]
    for row in summary["rows"]:
        inputs = "+".join(row["inputs"]) if isinstance(row["inputs"], list) else row["inputs"]
        cells = [(f"**{_fmt(row['cells'][n])}**" if n in row["best"] else _fmt(row["cells"][n])) for n in recipes]
        note = f"within spread of the best: {', '.join(row['within_spread_of_best'])}" if row["within_spread_of_best"] else ""
        lines.append(f"| {row['task']} | {row['protocol']} | {inputs} | {row['metric'] or '-'} | "
                     + " | ".join(cells) + f" | {note} |")
    lines += ["", f"| cost | " + " | ".join(recipes) + " |", "|" + "---|" * (len(recipes) + 1)]
    c = summary["cost"]
    for key, label, fmt in (("seconds", "pretraining wall time (s)", "{:.0f}"),
                            ("samples_per_s", "samples/s", "{:.1f}"),
                            ("step_cost_vs_baseline", f"step cost vs {cfg['baseline_recipe']}", "{:.2f}"),
                            ("peak_mem_mb", "peak memory (MiB)", "{:.0f}"),
                            ("trainable_params", "trainable parameters", "{:,.0f}"),
                            ("final_loss", "last logged loss", "{:.3f}")):
        vals = [("failed" if c[n]["status"] != "ok" else
                 fmt.format(c[n][key]) if c[n][key] == c[n][key] else "-") for n in recipes]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    failures = [(n, e) for n in recipes for e in c[n]["errors"] if e]
    if failures:
        lines += ["", "Failed recipes:"] + [f"- {n}: {e}" for n, e in failures]
    return "\n".join(lines) + "\n"


def plots(cfg: dict, summary: dict, out: Path) -> list[Path]:
    """``metrics.png`` (grouped bars: metric by task / protocol / inputs and recipe, spread as error bars) and
    ``cost.png`` (mean metric over every evaluation against pretraining wall time, one point per recipe)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    recipes = [r["name"] for r in cfg["recipes"]]
    rows = summary["rows"]
    paths = []
    if rows:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(rows) * max(2, len(recipes))), 5.0))
        width = 0.8 / max(1, len(recipes))
        x = np.arange(len(rows))
        for i, name in enumerate(recipes):
            means = [r["cells"][name]["mean"] if r["cells"][name]["n"] else 0.0 for r in rows]
            errs = [r["cells"][name]["spread"] or 0.0 for r in rows]
            ax.bar(x + (i - (len(recipes) - 1) / 2) * width, means, width, yerr=errs if any(errs) else None,
                   label=name, capsize=2)

        def short(inputs):  # "s2_rgb+s2_nir+s1" -> "rgb+nir+s1": the labels stay readable
            return "+".join(d.removeprefix("s2_") for d in inputs) if isinstance(inputs, list) else str(inputs)
        labels = [f"{r['task']}\n{r['protocol']}\n{short(r['inputs'])}" for r in rows]
        ax.set_xticks(x, labels, fontsize=6, rotation=30, ha="right")
        ax.set_ylabel("metric on the test split (accuracy / micro-F1 / mIoU)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax.set_title("Same data, budget and probes for every recipe", fontsize=9)
        fig.tight_layout()
        paths.append(out / "metrics.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    for name in recipes:
        cost = summary["cost"][name]
        values = [r["cells"][name]["mean"] for r in rows if r["cells"][name]["n"]]
        if cost["status"] != "ok" or not values:
            continue
        ax.scatter(cost["seconds"], statistics.fmean(values), s=40)
        ax.annotate(name, (cost["seconds"], statistics.fmean(values)), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("pretraining wall time (s)")
    ax.set_ylabel("mean metric over every task,\nprotocol and input subset")
    ax.set_title("Quality against pretraining cost", fontsize=9)
    fig.tight_layout()
    paths.append(out / "cost.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------- driver
def run_comparison(config_path: str | Path) -> dict:
    """Run (or resume) a comparison; returns what ``results.json`` holds.

    Raises:
        ConfigError: a bad comparison config or file set (nothing is pretrained then).
    """
    cfg = load_compare_config(config_path)
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    prepare_filesets(cfg)
    pretraining, evaluations = {}, []
    for seed in cfg["seeds"]:
        for recipe in cfg["recipes"]:
            pre = pretraining[(recipe["name"], seed)] = pretrain(cfg, recipe, seed)
            if pre["status"] != "ok":
                print(f"[compare] {recipe['name']} (seed {seed}) failed: {pre['error']}", flush=True)
            for task in cfg["tasks"]:
                for protocol in task["protocols"]:
                    for subset in task["subsets"]:
                        if pre["status"] != "ok":
                            evaluations.append({"recipe": recipe["name"], "seed": seed, "task": task["name"],
                                                "protocol": protocol, "inputs": subset or "config",
                                                "status": "failed", "error": "pretraining failed"})
                            continue
                        ev = evaluate(cfg, recipe, seed, task, protocol, subset, pre["checkpoint"], pre.get("config"))
                        if ev["status"] != "ok":
                            print(f"[compare] {recipe['name']} {task['name']} {protocol} {subset}: {ev['error']}",
                                  flush=True)
                        evaluations.append(ev)
    summary = summarise(cfg, pretraining, evaluations)
    table = markdown_table(cfg, summary)
    results = {"config": {k: v for k, v in cfg.items() if not k.startswith("_")}, "config_file": cfg["_path"],
               "code_commit": code_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "pretraining": {f"{n}/seed{s}": p for (n, s), p in pretraining.items()},
               "evaluations": evaluations, "summary": summary}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(table)
    results["pictures"] = [str(p) for p in plots(cfg, summary, out)]
    print(table)
    print(f"[compare] results: {out / 'results.json'}, {out / 'results.md'}, " + ", ".join(results["pictures"]))
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--config cfgs/compare/<name>.yaml``; 2 with one ``error:`` line on a bad config."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="comparison config (cfgs/compare/*.yaml)")
    args = parser.parse_args(argv)
    try:
        run_comparison(args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
