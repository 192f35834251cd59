"""tests.system."""
