"""The device's local OpenAI-compatible API (see `app.create_app`)."""

from edgefleet.agent.api.app import create_app

__all__ = ["create_app"]
