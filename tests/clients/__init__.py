"""Real client libraries driven against a real server."""
