"""The coordinator: zone registry, placement, moves."""
