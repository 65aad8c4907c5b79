"""The OpenAI-compatible surface: protocol models, handler and router."""
