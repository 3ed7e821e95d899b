"""Watching a served model: input drift against the statistics the export stage writes."""
