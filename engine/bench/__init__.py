"""The benchmark harness behind `sd-engine bench`: the same work on several contenders, side by side.

One module a concern: ``config`` (choices and the validated configuration), ``prompts`` (built-in
list and prompt files), ``models`` (model and engine folders, built into a cache when missing),
``child`` and ``contenders`` (one process per contender and what it measures), ``runner`` (spawns
the children, shows progress), ``stats`` (percentiles, summaries, ratios), ``machine`` (what the
numbers were measured on), ``report`` (terminal table, markdown), ``writers`` (JSON, CSV, PNG
chart), ``compare`` (regressions against a saved run) and ``cli`` (the subcommand).

Nothing here imports torch, diffusers or onnxruntime at module level: the diffusers contender
imports torch only inside its own child process.
"""
