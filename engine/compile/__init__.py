"""The compiler: Recipe → validated, resolved, estimated Plan. Imports no torch.

    recipe ──validate──▶ problems (all at once) ──resolve──▶ derived values ──estimate──▶ Plan

Every step is a pure function of the recipe and the files it names (cluster profile, tokenizer).
"""

from .plan import Job, Plan, compile_recipe

__all__ = ["Job", "Plan", "compile_recipe"]
