"""``posttrain`` command line: train | plugins | ls | show-config."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from .config import ConfigError, RunConfig
from .plugins import ALGORITHMS, EXTENSIONS, PluginError, installed, load_plugin_module, overridden_hooks
from .registry import load_registry, repo_root


def _user_errors():
    from .data import DataError

    return (ConfigError, PluginError, DataError, FileNotFoundError)


def cmd_train(args) -> int:
    from .run import train

    finals = train(args.config, args.overrides)
    for f in finals:
        print(f"final checkpoint: {f}")
    return 0


def _plugin_row(p) -> dict:
    row = {"name": p.name, "kind": "algorithm" if p.group == ALGORITHMS else "extension",
           "distribution": p.distribution, "version": p.version, "module": p.module}
    try:
        module = load_plugin_module(p.name, p.group)
    except PluginError as e:  # a broken plugin is listed, not fatal to the listing
        return {**row, "status": "broken", "error": str(e)}
    row["hooks"] = [h for h in overridden_hooks(module) if h]
    schema = getattr(module, "algorithm_config", None)
    if schema is not None and p.group == ALGORITHMS:
        cls = schema()
        row["config_fields"] = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
    return {**row, "status": "ok"}


def cmd_plugins(args) -> int:
    rows = [_plugin_row(p) for g in (ALGORITHMS, EXTENSIONS) for p in installed(g).values()]
    available = []
    if args.available:
        have = {r["name"] for r in rows}
        for name, entry in load_registry().get("algorithms", {}).items():
            src = entry.get("source")
            install = "(built in)" if entry.get("builtin") else (f"pip install -e {src}" if src else f"pip install {entry['distribution']}")
            available.append({"name": name, "distribution": entry.get("distribution", "posttrain"), "installed": name in have,
                              "status": entry.get("status"), "summary": entry.get("summary", ""), "install": install})
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
            state = "installed" if a["installed"] else "not installed"
            print(f"  {a['name']:<10} {state:<14} {a['summary']}")
            if not a["installed"]:
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
    for f in dataclasses.fields(schema):
        default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(default):
            lines += [f"{f.name}.{l}" for l in _field_help(type(default))]
        else:
            lines.append(f"{f.name} = {default!r}: {f.metadata.get('help', '')}")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="LLM post-training with algorithm plugins.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a YAML config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.lr=1e-6")
    t.set_defaults(fn=cmd_train)
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except _user_errors() as e:  # a user's mistake gets the message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
