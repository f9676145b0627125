"""Hook implementations of the importance plugin (filled in as the plugin is built)."""
