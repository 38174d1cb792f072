"""Price sources: where history and the latest price come from (providers, or a replayed CSV folder)."""
