"""CLI commands kept in their own modules; each exposes register(app)."""
