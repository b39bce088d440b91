"""The code that runs on every rank of a job: Megatron-Core models, the stage loops, checkpoints.

Unlike the compiler, this package imports torch and Megatron-Core.
"""
