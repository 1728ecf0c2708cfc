"""Per-community settings: what a Discord server's or Telegram group's admins chose with ``/settings``.

A community may only tighten the global config, which stays the ceiling: switch the bot off, limit it to some
channels, lower the daily limit per member, pick default parameters inside the configured limits, and choose
its age-restricted content policy (no more permissive than ``[moderation] max_policy``). Front ends check
that the caller is an admin of the community (Discord: Manage Server; Telegram: chat administrator) before
calling ``update``; every change is written to the audit log.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from generator.params import PARAMS
from generator.scheduler.api import DeliveryTarget, Refusal, RefusalCode, Requester
from generator.scheduler.core import SchedulerCore
from generator.scheduler.moderation import POLICIES
from storage import repo_audit, repo_communities
from storage.models import utcnow

# Parameters a community may give a default to: those with a config default that every user may change.
DEFAULTABLE = {p.name: p for p in PARAMS if p.configurable and p.who == "everyone"}
KEYS = ("enabled", "channels", "daily_limit", "policy", "nsfw_chat", "defaults")


@dataclass(frozen=True)
class CommunityView:
    platform: str
    community_id: str
    enabled: bool = True
    channels: tuple[str, ...] = ()  # Discord channel ids where the bot works; empty = everywhere
    daily_limit: int = 0  # videos per member and UTC day in this community; 0 = the global limit only
    policy: str = "block"  # age-restricted content: block, nsfw_channels, allow
    nsfw_chat: bool = False  # Telegram: the chat's admins opted it in as age-restricted
    defaults: dict[str, Any] = field(default_factory=dict)  # "expand" among them: the prompt-expansion default
    updated_by: str = ""
    updated_at: dt.datetime | None = None
    # From the global config (not stored): whether an expansion endpoint is configured, and the bot's own default.
    expand_offered: bool = False
    expand_global: bool = False

    @property
    def expand(self) -> bool:
        """Whether a request here without --expand/--no-expand is expanded (never without an endpoint)."""
        return self.expand_offered and bool(self.defaults.get("expand", self.expand_global))

    @property
    def key(self) -> str:
        return f"{self.platform}:{self.community_id}"

    def values(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k in KEYS for v in [getattr(self, k)]}

    def as_json(self) -> dict[str, Any]:
        return {"platform": self.platform, "community": self.community_id, **self.values(), "expand": self.expand,
                "updated_by": self.updated_by, "updated_at": self.updated_at.isoformat() if self.updated_at else None}


def community_of(target: DeliveryTarget) -> str:
    """The community a target belongs to: the Discord server, or a Telegram group (negative chat ids);
    "" for direct messages and the console."""
    if target.guild_id:
        return target.guild_id
    if target.platform == "telegram" and target.chat_id.startswith("-"):
        return target.chat_id
    return ""


def channel_list(channels: tuple[str, ...]) -> str:
    return ", ".join(f"<#{c}>" for c in channels)


class Communities:
    """Read and change community settings; ``check`` applies them to a submission."""

    def __init__(self, core: SchedulerCore) -> None:
        self._core = core

    def _view(self, platform: str, community_id: str, values: dict[str, Any] | None, by: str = "",
              at: dt.datetime | None = None) -> CommunityView:
        v = dict(values or {})
        settings = self._core.settings
        return CommunityView(
            platform=platform, community_id=community_id, enabled=bool(v.get("enabled", True)),
            channels=tuple(str(c) for c in v.get("channels", ())), daily_limit=int(v.get("daily_limit", 0)),
            policy=str(v.get("policy", settings.moderation.default_policy)),
            nsfw_chat=bool(v.get("nsfw_chat", False)), defaults=dict(v.get("defaults", {})), updated_by=by,
            updated_at=at, expand_offered=bool(settings.expand.url), expand_global=settings.defaults.expand,
        )

    async def get(self, platform: str, community_id: str) -> CommunityView:
        async with self._core.db.read() as s:
            row = await repo_communities.get_row(s, platform, community_id)
        if row is None:
            return self._view(platform, community_id, None)
        return self._view(platform, community_id, row.values, row.updated_by, row.updated_at)

    async def for_target(self, target: DeliveryTarget) -> CommunityView | None:
        community = community_of(target)
        return await self.get(target.platform, community) if community else None

    async def defaults_for(self, target: DeliveryTarget) -> dict[str, Any]:
        """The community's default parameters for a new request sent to ``target`` ({} outside one)."""
        view = await self.for_target(target)
        if view is None:
            return {}
        defaults = dict(view.defaults)
        if not view.expand_offered:  # a default stored while an endpoint was configured means nothing now
            defaults.pop("expand", None)
        return defaults

    async def list(self) -> list[CommunityView]:
        async with self._core.db.read() as s:
            rows = await repo_communities.list_all(s)
        return [self._view(r.platform, r.community_id, r.values, r.updated_by, r.updated_at) for r in rows]

    def _validated(self, current: CommunityView, changes: dict[str, Any]) -> dict[str, Any]:
        """``current`` with ``changes`` applied, each checked against the global ceiling (``Refusal`` if not)."""
        settings = self._core.settings
        values = current.values()
        for key, value in changes.items():
            if key == "enabled" or key == "nsfw_chat":
                values[key] = bool(value)
            elif key == "channels":
                chans = [str(c).strip() for c in (value or [])]
                if any(not c.isdigit() for c in chans):
                    raise Refusal(RefusalCode.INVALID, "Channels must be given as channel mentions or ids.")
                values[key] = sorted(set(chans))
            elif key == "daily_limit":
                limit = int(value)
                ceiling = settings.quotas.daily_jobs_per_user
                if limit < 0:
                    raise Refusal(RefusalCode.INVALID, "The daily limit must be 0 (no extra limit) or more.")
                if ceiling > 0 and limit > ceiling:
                    raise Refusal(RefusalCode.INVALID, f"The daily limit can be at most {ceiling} (the bot's own limit).")
                values[key] = limit
            elif key == "policy":
                policy = str(value)
                if policy not in POLICIES:
                    raise Refusal(RefusalCode.INVALID, f"The policy must be one of: {', '.join(POLICIES)}.")
                most = settings.moderation.max_policy
                if POLICIES.index(policy) > POLICIES.index(most):
                    raise Refusal(RefusalCode.INVALID, f"This bot allows at most the policy '{most}'.")
                values[key] = policy
            elif key == "defaults":
                merged = dict(values["defaults"])
                limits = settings.request_limits
                for name, raw in dict(value or {}).items():
                    param = DEFAULTABLE.get(name)
                    if param is None:
                        raise Refusal(RefusalCode.INVALID, f"'{name}' cannot be given a community default.")
                    if raw is None:
                        merged.pop(name, None)
                        continue
                    if name == "expand" and raw is True and not settings.expand.url:
                        # The global config is the ceiling: no endpoint, nothing to switch on.
                        raise Refusal(RefusalCode.INVALID, "Prompt expansion is not offered by this bot (its "
                                                           "operator has not set up an expansion service).")
                    try:
                        merged[name] = param.check(raw, limits)
                    except Exception as exc:  # RequestError: out of the configured range
                        raise Refusal(RefusalCode.INVALID, getattr(exc, "message", str(exc))) from None
                values[key] = merged
            elif key == "reset_defaults":
                if value:
                    values["defaults"] = {}
            else:
                raise Refusal(RefusalCode.INVALID, f"Unknown setting '{key}'.")
        return values

    async def update(self, requester: Requester, platform: str, community_id: str,
                     changes: dict[str, Any]) -> CommunityView:
        """Apply ``changes`` (keys of ``KEYS``, plus ``reset_defaults``). The caller checked that
        ``requester`` administers the community."""
        if not community_id:
            raise Refusal(RefusalCode.INVALID, "Settings can only be changed in a server or group, not here.")
        current = await self.get(platform, community_id)
        values = self._validated(current, changes)
        now = utcnow()
        async with self._core.db.write() as s:
            await repo_communities.put_values(s, platform, community_id, values, by=requester.key, now=now)
            await repo_audit.add_audit(s, "community_settings", detail=json.dumps({
                "who": requester.key, "where": f"{platform}:{community_id}", "changes": changes,
            }, default=str), now=now)
        return dataclasses.replace(self._view(platform, community_id, values, requester.key, now))
