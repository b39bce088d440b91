"""engine: a declarative, recipe-compiled training engine for chat LLMs on Megatron-Core.

The import of this package is deliberately light: the recipe, the compiler and the CLI import no
torch. Torch and Megatron-Core are imported only inside the worker that trains a stage.
"""

__version__ = "0.1.0"
