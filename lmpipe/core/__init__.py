"""What every stage shares: errors, params, atomic I/O, the project root, the stage guard, tracking, lineage."""
