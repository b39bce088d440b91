"""Built-in plugins. They are written only against the public API in engine.plugin and register
through the same entry points (see pyproject.toml) as third-party plugins do."""
