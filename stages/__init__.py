"""DVC stage entry points: ``python -m stages.<stage>``, run from the project root."""
