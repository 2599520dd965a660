"""Use cases. Each service takes a session and its collaborators as keyword arguments, owns its commit, and
raises the domain errors of `app.services.errors`, never HTTP errors."""
