"""Experiments ("recipes"): registry, runner and report helpers.

A recipe is a plain training loop plus one config dataclass with a preset per *tier*:

* ``ci`` — seconds; used by the tests.
* ``quick`` — at most ~20 minutes on 2 CPU cores, one seed.
* ``cpu`` — the honest CPU-scale reproduction: hours, at least 3 seeds, mean ± std.
* ``paper`` — the papers' own hyperparameters (for users with GPUs).

Writing one::

    from dataclasses import dataclass
    from ntkit.errors import check
    from ntkit.recipes import register_recipe

    @dataclass
    class MyConfig:
        epochs: int = 3           # training epochs
        lr: float = 1e-3          # Adam learning rate
        seeds: tuple[int, ...] = (0,)

        def __post_init__(self) -> None:
            check(self.epochs >= 1, "epochs", self.epochs, "an int >= 1")

    @register_recipe(
        "my-recipe",
        tiers={"ci": MyConfig(epochs=1), "quick": MyConfig(), "cpu": MyConfig(epochs=30, seeds=(0, 1, 2)),
               "paper": MyConfig(epochs=100, seeds=(0, 1, 2))},
        description="one line shown by `ntkit ls recipes`",
    )
    def my_recipe(cfg: MyConfig, out_dir: Path, data_dir: Path | None) -> dict:
        ...   # train; write plots into out_dir with line_plot / heatmap
        return {"summary": {...}, "tables": {"Results": [row, ...]}, "plots": ["curve.png"]}

The runner (:func:`run_recipe`, or ``ntkit run my-recipe --tier ci key=value …``) resolves the tier
preset, applies typed ``key=value`` overrides (from ``--config FILE.yaml``, then the command line;
re-running the dataclass' validation), writes ``config.json``, calls the recipe, and writes
``results.json`` and ``report.md``. The returned dict
is free-form JSON; the default report renders these conventional keys:

* ``summary``: flat ``{name: value}`` → a two-column table;
* ``tables``: ``{title: [row dict, …]}`` → one markdown table each (e.g. the paper's columns,
  with the paper's published numbers beside ours in labelled columns);
* ``plots``: PNG file names (relative to ``out_dir``) → embedded images;
* ``notes``: list of strings → bullet list (e.g. "trained on WikiText-2 valid: train split
  not available offline").

A recipe may pass ``report=fn(doc, out_dir) -> str`` to render its own markdown (``doc`` is the
content of ``results.json``).

Recipe modules: every module of this package (``ntkit/recipes/*.py``, private ones included) is
imported on first use of the registry (:func:`list_recipes`, :func:`get_recipe`, the CLI), so
registering is just decorating the function in such a module. Recipes defined
elsewhere (a user's package) register by being imported before the runner is called.
"""

from __future__ import annotations

from ntkit.recipes._runner import (
    RECIPES,
    TIERS,
    Recipe,
    apply_overrides,
    get_recipe,
    list_recipes,
    load_overrides_file,
    parse_overrides,
    register_recipe,
    rerender_report,
    resolve_config,
    run_recipe,
)
from ntkit.recipes.report import (
    aggregate_seeds,
    fmt_mean_std,
    heatmap,
    line_plot,
    markdown_table,
    mean_std,
    progress,
    render_report,
)

__all__ = [
    "RECIPES",
    "TIERS",
    "Recipe",
    "aggregate_seeds",
    "apply_overrides",
    "fmt_mean_std",
    "get_recipe",
    "heatmap",
    "line_plot",
    "list_recipes",
    "load_overrides_file",
    "markdown_table",
    "mean_std",
    "parse_overrides",
    "progress",
    "register_recipe",
    "render_report",
    "rerender_report",
    "resolve_config",
    "run_recipe",
]
