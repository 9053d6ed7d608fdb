"""Studies on disk and in the journal: placement, states, completeness, retention."""
