"""Hook implementations of the taylor plugin (filled in as the plugin is built)."""
