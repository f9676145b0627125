"""Hook implementations of the resrep plugin (filled in as the plugin is built)."""
