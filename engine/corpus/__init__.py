"""The data stage's text processing: cleaning filters, deduplication and decontamination, the tokenizer.

Pure Python over strings, no torch: the data stage (engine.worker.stages.collect) streams every
record through them.
"""
