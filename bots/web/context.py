"""The console's shared state, stored on the aiohttp application."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from bots.texts import refusal_text
from bots.web.events import StreamHub
from bots.web.metrics import ConsoleMetrics
from bots.web.security import Auth
from generator.scheduler.api import DeliveryTarget, Refusal, Requester, SchedulerAPI
from turbobot.config import Settings

# The person at the console. Every job submitted here belongs to this user; admin actions are taken
# in its name. The scheduler treats it as a local operator (an owner): the console answers only on
# loopback or behind the admin token.
OPERATOR = Requester("web", "operator", "Console operator")
WEB_TARGET = DeliveryTarget(platform="web", chat_id="console")


@dataclass
class Console:
    settings: Settings
    scheduler: SchedulerAPI
    auth: Auth
    hub: StreamHub
    metrics: ConsoleMetrics
    poll_seconds: float = 1.0
    operator: Requester = OPERATOR
    target: DeliveryTarget = WEB_TARGET

    def refusal_response(self, refusal: Refusal) -> web.Response:
        self.metrics.web_refusals[refusal.code.metric_label] += 1
        message = refusal_text(refusal)
        body = {
            "error": refusal.code,
            "message": message,
            "retry_at": refusal.retry_at.isoformat() if refusal.retry_at else None,
            "job_id": refusal.job_id,
        }
        return web.json_response(body, status=refusal.code.http_status)


CONSOLE = web.AppKey("turbobot_console", Console)


def console_of(request: web.Request) -> Console:
    return request.app[CONSOLE]
