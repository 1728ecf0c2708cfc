"""The Telegram front end (python-telegram-bot 22), thin over ``bots.commands`` and the scheduler.

``turbobot run`` calls ``run_telegram(settings, scheduler, token, stop)``.
"""

from bots.telegram.app import run_telegram

__all__ = ["run_telegram"]
