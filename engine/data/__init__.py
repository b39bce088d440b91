"""Data collection building blocks: cleaning filters, deduplication and decontamination.

Pure Python over strings, no torch: the data stage streams every record through them.
"""
