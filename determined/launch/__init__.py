"""Determined's launchers, each running Kiln's of the same name (``kiln.launch``)."""
