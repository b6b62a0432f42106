"""Determined's ``determined.experimental`` namespace: ``from kiln.experimental import client``.

Nothing is imported here: ``client`` is a submodule, loaded by the import statement that names it, so
``import kiln`` (and the training code that only needs the Core API) never pays for the SDK's HTTP client.
"""
