"""The admin API (``/admin``) over the target store: protocol models, handler, router, and its CLI client."""
