"""The `lmpipe` command: params check, audit, predict, compare."""
