"""The worker-side API: tables, push, pull, timestamps (async core, sync facade)."""
