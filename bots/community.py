"""``/settings`` for a community's admins, shared by the chat front ends: parse what they typed into the
changes the scheduler's ``communities.update`` takes, and show the current settings."""

from __future__ import annotations

import re
from typing import Any

from bots.flags import parse_flags
from generator.params import PARAM
from generator.request import RequestError
from generator.scheduler.api import Refusal
from generator.scheduler.community import CommunityView
from generator.scheduler.moderation import POLICIES

POLICY_WORDS = {"block": "blocked", "nsfw_channels": "only in age-restricted channels", "allow": "allowed"}
ON = ("on", "yes", "true", "1")
OFF = ("off", "no", "false", "0")


def parse_defaults(text: str) -> dict[str, Any]:
    """"--steps 2 --ar 9:16" -> {"steps": 2, "aspect": "9:16"}; "clear" -> every default removed."""
    if text.strip().lower() in ("clear", "none", "reset"):
        return {"reset_defaults": True}
    try:
        parsed = parse_flags(text)
    except RequestError as exc:
        raise Refusal("invalid", exc.message) from None
    if parsed.prompt:
        raise Refusal("invalid", "Give defaults as flags, e.g. --steps 2 --ar 9:16 (or 'clear').")
    return {"defaults": parsed.options}


def parse_channels(text: str) -> list[str]:
    """Channel mentions or ids ("<#123> 456"); "all" (or "everywhere") clears the list."""
    if text.strip().lower() in ("all", "everywhere", "any", "clear"):
        return []
    ids = re.findall(r"\d{5,20}", text)
    if not ids:
        raise Refusal("invalid", "Name channels by mention (#channel) or id, or say 'all'.")
    return ids


def parse_switch(text: str, name: str) -> bool:
    word = text.strip().lower()
    if word in ON:
        return True
    if word in OFF:
        return False
    raise Refusal("invalid", f"{name} must be on or off.")


def parse_expand(text: str) -> dict[str, Any]:
    """The community's prompt-expansion default: "on", "off", or "default" (back to the bot's own)."""
    if text.strip().lower() in ("default", "clear", "reset"):
        return {"defaults": {"expand": None}}
    return {"defaults": {"expand": parse_switch(text, "expand")}}


def parse_text(text: str, *, platform: str) -> dict[str, Any]:
    """Telegram: "/settings KEY VALUE" -> changes. Keys: bot, policy, limit, defaults, expand, nsfw."""
    key, _, value = text.strip().partition(" ")
    key, value = key.lower(), value.strip()
    if key == "bot":
        return {"enabled": parse_switch(value, "bot")}
    if key == "policy":
        if value not in POLICIES:
            raise Refusal("invalid", f"The policy must be one of: {', '.join(POLICIES)}.")
        return {"policy": value}
    if key in ("limit", "daily_limit"):
        if not value.isdigit():
            raise Refusal("invalid", "The daily limit per member must be a whole number (0 = no extra limit).")
        return {"daily_limit": int(value)}
    if key == "defaults":
        return parse_defaults(value)
    if key == "expand":
        return parse_expand(value)
    if key == "nsfw" and platform == "telegram":
        return {"nsfw_chat": parse_switch(value, "nsfw")}
    if key == "channels" and platform == "discord":
        return {"channels": parse_channels(value)}
    raise Refusal("invalid", "Unknown setting. Use: bot on|off, policy block|nsfw_channels|allow, limit N, "
                             "defaults --steps 2 … (or clear), expand on|off|default" + (", nsfw on|off." if platform == "telegram" else "."))


def expand_line(view: CommunityView) -> str:
    """Whether prompts here are expanded unless a request says --expand/--no-expand."""
    if not view.expand_offered:
        return "prompt expansion: not offered by this bot"
    whose = "this community’s default" if "expand" in view.defaults else "the bot’s own default"
    return f"prompt expansion: {'on' if view.expand else 'off'} ({whose}; --expand/--no-expand per request)"


def settings_text(view: CommunityView, platform: str) -> str:
    """The community's settings, for its admins."""
    lines = ["Settings for this " + ("server" if platform == "discord" else "group") + ":",
             f"• bot: {'on' if view.enabled else 'off'}"]
    if platform == "discord":
        lines.append("• channels: " + (", ".join(f"<#{c}>" for c in view.channels) or "all"))
    lines.append(f"• daily limit per member: {view.daily_limit or 'the bot’s own'}")
    lines.append(f"• age-restricted content ({view.policy}): {POLICY_WORDS.get(view.policy, view.policy)}")
    if platform == "telegram":
        lines.append(f"• age-restricted chat (nsfw): {'on' if view.nsfw_chat else 'off'}")
    shown = " ".join(f"{PARAM[k].label}={PARAM[k].shown(v)}" for k, v in view.defaults.items()
                     if k in PARAM and k != "expand")
    lines.append(f"• defaults: {shown or 'the bot’s own'}")
    lines.append(f"• {expand_line(view)}")
    if view.updated_by:
        lines.append(f"Last changed by {view.updated_by}.")
    return "\n".join(lines)
