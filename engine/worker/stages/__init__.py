"""One module per stage kind; engine.worker.main dispatches to them through one table."""
