"""The application papers: small runnable applications on moekit parts (``moekit app NAME``).

See :mod:`moekit.apps.registry` for the registry and ``docs/applications.md`` for what each measures.
"""

from .registry import AppSpec, MissingExtra, get_app, list_apps, register_app, require

__all__ = ["AppSpec", "MissingExtra", "get_app", "list_apps", "register_app", "require"]
