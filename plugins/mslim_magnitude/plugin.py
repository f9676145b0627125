"""Hook implementations of the magnitude plugin (filled in as the plugin is built)."""
