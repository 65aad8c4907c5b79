"""unlearn-gateway: an OpenAI-compatible gateway that makes a served model forget named targets."""

__version__ = "0.1.0"

__all__ = ["__version__", "create_app"]


def __getattr__(name: str):
    # Importing the app pulls in FastAPI and torch; keep `import gateway` cheap for the CLI.
    if name == "create_app":
        from gateway.app import create_app

        return create_app
    raise AttributeError(name)
