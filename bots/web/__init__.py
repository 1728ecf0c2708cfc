"""The local web console (playground, gallery, admin, health and metrics); see ``bots.web.app``."""

from bots.web.app import create_web_app, run_web, start_web
from bots.web.security import WebConfigError

__all__ = ["WebConfigError", "create_web_app", "run_web", "start_web"]
