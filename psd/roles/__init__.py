"""The three daemon roles: scheduler, server, worker."""
