"""Alembic migrations for the turbobot database (a package so they ship with the wheel; see README.md)."""
