"""Pure algorithms over exchanges: sessions, templates, workflow DAGs, predictions.

Nothing here does I/O: no aiohttp, SQLAlchemy or torch imports.
"""
