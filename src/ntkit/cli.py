"""The ``ntkit`` command line (also ``python -m ntkit``).

::

    ntkit ls [models|datasets|methods|recipes]
    ntkit demo [--out DIR] [--data-dir DIR] [--tier T] [key=value ...]
    ntkit run RECIPE [--tier {ci,quick,cpu,paper}] [--data-dir DIR] [--out DIR] [--config FILE.yaml]
                     [--resume] [--dry-run] [key=value ...]
    torchrun --standalone --nproc_per_node N -m ntkit run RECIPE ...   (data-parallel; rank 0 writes)
    ntkit bench {ntk,backward} [args ...]
    ntkit report RUN_DIR                     (re-render RUN_DIR/report.md)
    ntkit report RUN… [--out FILE]           (merge runs: seeds, recipes, machines)

User errors (:class:`ntkit.errors.NtkitError`: unknown names, bad tier or override, missing data
dir, corrupt files) and command-line usage errors print ONE line ``ntkit: error: …`` on stderr
and return exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ntkit.errors import ConfigError, NtkitError

__all__ = ["BENCHES", "build_parser", "main"]

#: ``ntkit bench <name>`` → script under the repository's ``bench/`` folder.
BENCHES = {"ntk": "ntk_engine.py", "backward": "partial_backward.py", "ntt": "ntt_step.py", "pruned": "pruned_step.py"}

_KINDS = ("models", "datasets", "methods", "recipes")
_TIERS = ("ci", "quick", "cpu", "paper")


class _UsageError(NtkitError):
    """argparse usage error, reported like any user error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sub = self.prog.removeprefix("ntkit").strip()
        raise _UsageError(f"{sub}: {message}" if sub else message)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``ntkit`` (exposed for docs and tests)."""
    p = _Parser(prog="ntkit", description="Neural-tangent-kernel tools: MAT, PL pruning, NTT.")
    from ntkit import __version__

    p.add_argument("--version", action="version", version=f"ntkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    ls = sub.add_parser(
        "ls",
        help="list registered models, datasets, methods or recipes",
        description="List registered models, datasets, methods or recipes (all when omitted).",
    )
    ls.add_argument("kind", nargs="?", choices=_KINDS, help="what to list (default: everything)")

    demo = sub.add_parser(
        "demo",
        help="vanilla vs MAT vs Rand vs Multirate vs the replayed random control on the embedded digits (1-4 min on 2 CPU cores)",
        description="Run recipe `demo` (tier quick by default, 1-4 min on 2 CPU cores): vanilla vs MAT vs Rand vs Multirate vs the replayed random control, a small ViT on the embedded "
        "scikit-learn digits; prints train loss, test accuracy, wall-clock and executed "
        "FLOPs and writes results.json / report.md.",
    )
    demo.add_argument("--out", default="ntkit-demo", help="output directory (default: ./ntkit-demo)")
    demo.add_argument("--data-dir", default=None, help="dataset directory (not needed for digits)")
    demo.add_argument("--tier", default="quick", choices=_TIERS, help="recipe tier (default: quick, 1-4 min on 2 CPU cores)")
    demo.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="config overrides")

    run = sub.add_parser(
        "run",
        help="run a recipe (experiment) at a tier",
        description="Run RECIPE at --tier, writing config.json, results.json, report.md and "
        "plots to --out. Overrides key=value are typed by the recipe's config fields "
        "(dotted keys reach nested groups).",
    )
    run.add_argument("recipe", help="recipe name (see `ntkit ls recipes`)")
    run.add_argument(
        "--tier",
        default="quick",
        choices=_TIERS,
        help="ci: seconds; quick: <= 20 min on 2 cores; cpu: hours, >= 3 seeds; paper: the "
        "papers' settings (default: quick)",
    )
    run.add_argument("--data-dir", default=None, help="dataset directory (default: $NTKIT_DATA_DIR when set)")
    run.add_argument("--out", default=None, help="output directory (default: runs/RECIPE-TIER)")
    run.add_argument(
        "--config",
        default=None,
        metavar="FILE.yaml",
        help="YAML mapping of config overrides (nested mappings = dotted keys); command-line key=value wins",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest good checkpoints (same recipe, tier and overrides); "
        "finished (method, seed) runs are not trained again",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the fully resolved config as JSON and exit without running",
    )
    run.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="config overrides")

    bench = sub.add_parser(
        "bench",
        help="run a benchmark from the repository's bench/ folder",
        description="Dispatch to bench/ntk_engine.py (ntk) or bench/partial_backward.py "
        "(backward); remaining arguments go to the benchmark (try `ntkit bench ntk "
        "--help`). Needs a source checkout (set NTKIT_BENCH_DIR otherwise).",
    )
    bench.add_argument("which", choices=sorted(BENCHES), help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")

    _add_analyze_parser(sub)

    rep = sub.add_parser(
        "report",
        help="re-render a run's report.md, or merge several runs into one report",
        description="With one RUN_DIR and no --out: re-render RUN_DIR/report.md from RUN_DIR/results.json. "
        "With several (run directories or results.json files: seeds, recipes, machines) or --out: merge them "
        "into one markdown report — per recipe and config, every method's mean ± std over all seeds, the "
        "papers' published numbers beside ours, the machines and plots (see ntkit.recipes.merge); written "
        "to --out, else printed.",
    )
    rep.add_argument("run_dir", nargs="+", metavar="RUN", help="run directories written by `ntkit run`, or results.json files")
    rep.add_argument("--out", default=None, metavar="FILE", help="write the merged report here (links relative to it)")
    rep.add_argument("--paper-numbers", default=None, metavar="FILE", help="paper_numbers.json (default: found "
                     "next to --data-dir / $NTKIT_DATA_DIR / the runs' data directories)")
    rep.add_argument("--data-dir", default=None, help="dataset directory whose ../reference/ holds paper_numbers.json")
    return p


def _add_analyze_parser(sub: Any) -> None:
    an = sub.add_parser(
        "analyze",
        help="plot the mNTK dynamics of a recipe's model over training (λmax heatmaps, spectra, Tr(H))",
        description="Train RECIPE's model with vanilla at --tier (or read the checkpoints in OUT/checkpoints/ "
        "of a finished run) and, at initialisation and every epoch, compute per-head mNTK λmax / effective "
        "rank, the NTK eigen-spectrum with its information / nuisance split, the NTK condition number and "
        "the Hessian trace; writes PNG figures and CSV tables to --out (see ntkit.analyze).",
    )
    an.add_argument("--recipe", required=True, help="recipe name (see `ntkit ls recipes`), e.g. mat-bert")
    an.add_argument("--tier", default="ci", choices=_TIERS, help="recipe tier (default: ci)")
    an.add_argument("--data-dir", default=None, help="dataset directory (default: $NTKIT_DATA_DIR when set)")
    an.add_argument("--out", default=None, help="output directory (default: runs/analyze-RECIPE-TIER)")
    an.add_argument("--num-samples", type=int, default=None, help="probe samples S (default: the recipe's MAT S)")
    an.add_argument("--num-probes", type=int, default=4, help="Hutchinson probes per Hessian trace (default: 4)")
    an.add_argument("--info-share", type=float, default=0.9,
                    help="share of the NTK trace in the information space (default: 0.9)")
    an.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="recipe config overrides")


def _cmd_analyze(args: argparse.Namespace) -> int:
    from ntkit.analyze import analyze
    from ntkit.recipes import get_recipe

    get_recipe(args.recipe)  # unknown recipe → one-line error before anything is created
    data_dir = args.data_dir if args.data_dir is not None else os.environ.get("NTKIT_DATA_DIR") or None
    out = args.out or str(Path("runs") / f"analyze-{args.recipe}-{args.tier}")
    doc = analyze(args.recipe, args.tier, out, data_dir, overrides=args.overrides, num_samples=args.num_samples,
                  num_probes=args.num_probes, info_share=args.info_share)
    print(f"analysed epochs {doc['epochs']}; wrote {', '.join(doc['files'])} to {out}")
    return 0


# --------------------------------------------------------------------------- commands
def _optional_list(module: str, func: str) -> list[str] | None:
    """``module.func()``, or None if that package is not part of this installation."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return None
        raise
    return list(getattr(mod, func)())


def _describe_recipes() -> list[str]:
    from ntkit.recipes import get_recipe, list_recipes

    out = []
    for name in list_recipes():
        desc = get_recipe(name).description
        out.append(f"{name:<16} {desc}".rstrip())
    return out


def _cmd_ls(args: argparse.Namespace) -> int:
    sources = {
        "models": lambda: _optional_list("ntkit.models", "list_models"),
        "datasets": lambda: _optional_list("ntkit.data", "list_datasets"),
        "methods": lambda: _optional_list("ntkit.methods", "list_methods"),
        "recipes": _describe_recipes,
    }
    kinds = [args.kind] if args.kind else list(_KINDS)
    for kind in kinds:
        names = sources[kind]()
        if len(kinds) > 1:
            print(f"{kind}:")
        if names is None:
            print(("  " if len(kinds) > 1 else "") + f"(ntkit.{kind} is not installed)")
            continue
        for n in names:
            print(("  " if len(kinds) > 1 else "") + n)
    return 0


def _print_tables(doc: dict) -> None:
    from ntkit.recipes import markdown_table

    results = doc.get("results") or {}
    for title, rows in (results.get("tables") or {}).items():
        print(f"\n{title}\n")
        print(markdown_table(rows), end="")
    for note in results.get("notes") or []:
        print(f"- {note}")


def _run(recipe: str, tier: str, out: str, data_dir: str | None, overrides: Sequence[str],
         resume: bool = False) -> int:
    from ntkit.recipes import run_recipe
    from ntkit.train import dist

    doc = run_recipe(recipe, tier, out, data_dir=data_dir, overrides=overrides, resume=resume)
    if not dist.is_main():
        return 0
    _print_tables(doc)
    print(f"\nwrote {Path(out) / 'report.md'} ({doc['wall_clock_s']:.1f} s)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    return _run("demo", args.tier, args.out, args.data_dir, args.overrides)


def _cmd_run(args: argparse.Namespace) -> int:
    from ntkit.recipes import get_recipe, load_overrides_file, parse_overrides, resolve_config
    from ntkit.recipes._runner import config_to_dict

    get_recipe(args.recipe)  # unknown recipe → one-line error before anything is created

    overrides = load_overrides_file(args.config) if args.config else {}
    overrides.update(parse_overrides(args.overrides))
    if args.dry_run:
        cfg = resolve_config(args.recipe, args.tier, overrides)
        print(json.dumps({"recipe": args.recipe, "tier": args.tier, "config": config_to_dict(cfg)}, indent=2))
        return 0
    data_dir = args.data_dir if args.data_dir is not None else os.environ.get("NTKIT_DATA_DIR") or None
    out = args.out or str(Path("runs") / f"{args.recipe}-{args.tier}")
    return _run(args.recipe, args.tier, out, data_dir, [f"{k}={v}" for k, v in overrides.items()],
                resume=args.resume)


def _bench_dir() -> Path:
    env = os.environ.get("NTKIT_BENCH_DIR")
    if env:
        return Path(env)
    import ntkit

    return Path(ntkit.__file__).resolve().parents[2] / "bench"  # src/ntkit/__init__.py → repo


def _cmd_bench(args: argparse.Namespace) -> int:
    script = _bench_dir() / BENCHES[args.which]
    if not script.is_file():
        raise ConfigError(
            f"bench={args.which!r}: {script} not found (benchmarks ship with the source repository; "
            "run from a checkout or set NTKIT_BENCH_DIR)"
        )
    spec = importlib.util.spec_from_file_location(f"_ntkit_bench_{args.which}", script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses & pickling look the module up by name
    sys.path.insert(0, str(script.parent))
    try:
        spec.loader.exec_module(mod)
        if not callable(getattr(mod, "main", None)):
            raise ConfigError(f"bench={args.which!r}: {script} has no main(argv)")
        rc = mod.main(list(args.args))
    finally:
        sys.modules.pop(spec.name, None)
        with_path = str(script.parent)
        if with_path in sys.path:
            sys.path.remove(with_path)
    return _exit_code(rc)


def _exit_code(rc: object) -> int:
    """A benchmark ``main``'s return value as an exit code: an int as is; ``None`` or anything
    else (e.g. a summary it also printed) means it finished: 0."""
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0


def _cmd_report(args: argparse.Namespace) -> int:
    if len(args.run_dir) == 1 and args.out is None:
        from ntkit.recipes import rerender_report

        path = rerender_report(args.run_dir[0])
        print(f"wrote {path}")
        return 0
    from ntkit.recipes.merge import merge_report

    text = merge_report(args.run_dir, args.out, paper_numbers=args.paper_numbers, data_dir=args.data_dir)
    print(f"wrote {args.out}" if args.out is not None else text, end="\n" if args.out is not None else "")
    return 0


_COMMANDS: dict[str, Any] = {
    "ls": _cmd_ls,
    "demo": _cmd_demo,
    "run": _cmd_run,
    "bench": _cmd_bench,
    "report": _cmd_report,
    "analyze": _cmd_analyze,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ntkit`` command; returns the exit code (0 ok, 2 user error)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
        # argparse does not intermix a trailing nargs="*" positional with options
        # (``run R --tier ci lr=1``): collect leftover key=value words as overrides.
        if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command in ("demo", "run", "bench"):
            from ntkit.train.allocator import tune_cpu_allocator

            tune_cpu_allocator()  # reuse freed CPU memory (NTKIT_MALLOC=system opts out)
        return _COMMANDS[args.command](args)
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except NtkitError as e:
        msg = " ".join(str(e).split())  # exactly one line
        print(f"ntkit: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ntkit: interrupted", file=sys.stderr)
        return 130
