"""Hook implementations of the slimming plugin (filled in as the plugin is built)."""
