"""graftkit's built-in plugins. They are listed in registry.toml and loaded exactly like third-party ones."""
