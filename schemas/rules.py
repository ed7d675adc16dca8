"""The rules file (`MAILRAIL_RULES`): IP pools, per-destination shaping, provider groups, backoff.

A destination is a throttle key: a provider group (every domain whose MX host ends in one of
the group's suffixes, or that the group lists) or else the recipient domain. One sender owns
a key at a time, so a key's quota holds however many senders run.
"""

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

_Name = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[a-z0-9][a-z0-9-]*$")]
TlsPolicy = Literal["opportunistic", "required", "disabled"]


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Pool(_Rule):
    name: _Name
    ehlo: str = "mailrail.localhost"
    source_addresses: list[str] = Field(default_factory=list)
    #: A return path per recipient (VERP), so asynchronous bounces match their recipient.
    #: Off: recipients of a batch whose body is identical share one transaction.
    verp: bool = True


class Shaping(_Rule):
    """How fast and how wide one destination may be mailed. `None` rates are unlimited."""

    messages_per_s: float | None = Field(default=None, gt=0)
    messages_per_min: float | None = Field(default=None, gt=0)
    messages_per_h: float | None = Field(default=None, gt=0)
    max_connections: int = Field(default=10, ge=1, le=1000)
    max_messages_per_connection: int = Field(default=100, ge=1)
    max_recipients_per_batch: int = Field(default=50, ge=1, le=1000)
    tls: TlsPolicy = "opportunistic"

    def windows(self) -> list[tuple[float, float]]:
        """(messages, seconds) for every configured rate."""
        limits = (
            (self.messages_per_s, 1.0),
            (self.messages_per_min, 60.0),
            (self.messages_per_h, 3600.0),
        )
        return [(count, seconds) for count, seconds in limits if count is not None]


class ShapingOverride(_Rule):
    """A destination's rule: any field left out comes from `defaults`."""

    messages_per_s: float | None = Field(default=None, gt=0)
    messages_per_min: float | None = Field(default=None, gt=0)
    messages_per_h: float | None = Field(default=None, gt=0)
    max_connections: int | None = Field(default=None, ge=1, le=1000)
    max_messages_per_connection: int | None = Field(default=None, ge=1)
    max_recipients_per_batch: int | None = Field(default=None, ge=1, le=1000)
    tls: TlsPolicy | None = None


class Provider(ShapingOverride):
    """A provider group: its domains share one quota (the throttle key is the group's name)."""

    domains: list[str] = Field(default_factory=list)
    mx_suffixes: list[str] = Field(default_factory=list)


_THROTTLE_PATTERNS = [
    r"\btry again later\b",
    r"\brate limit",
    r"\btoo many (connections|messages|recipients)\b",
    r"\bthrottl",
    r"\bslow down\b",
    r"\btemporarily deferred\b",
    r"\bexceeded .*(rate|limit)",
    r"^4\.7\.(0|28)\b",
]
_BLOCK_PATTERNS = [
    r"\bblock(ed|list)",
    r"\bblacklist",
    r"\bspamhaus\b",
    r"\bpoor reputation\b",
    r"\bbanned\b",
    r"\bdenied\b.*\b(ip|reputation|policy)",
    r"\bRBL\b",
]


class Backoff(_Rule):
    """Adaptive backoff: what a reply that means 'slow down' or 'blocked' does."""

    throttle_patterns: list[str] = Field(default_factory=lambda: list(_THROTTLE_PATTERNS))
    block_patterns: list[str] = Field(default_factory=lambda: list(_BLOCK_PATTERNS))
    #: A throttling reply multiplies the destination's rate and concurrency by this.
    cut_factor: float = Field(default=0.5, gt=0, lt=1)
    #: After this many successes in a row, rate and concurrency grow one step back.
    recover_after: int = Field(default=20, ge=1)
    recover_factor: float = Field(default=1.25, gt=1)
    #: The lowest rate backoff goes down to (messages per second).
    min_rate_per_s: float = Field(default=0.1, gt=0)
    #: A blocking reply pauses the destination, for this pool, this long.
    block_pause_s: float = Field(default=1800, ge=1)


class Rules(_Rule):
    default_pool: _Name = "default"
    bounce_domain: str = "bounces.mailrail.localhost"
    pools: list[Pool] = Field(default_factory=lambda: [Pool(name="default")], min_length=1)
    defaults: Shaping = Field(default_factory=Shaping)
    domains: dict[str, ShapingOverride] = Field(default_factory=dict)
    providers: dict[_Name, Provider] = Field(default_factory=dict)
    backoff: Backoff = Field(default_factory=Backoff)

    @model_validator(mode="after")
    def _consistent(self) -> "Rules":
        names = self.pool_names()
        if len(set(names)) != len(names):
            raise ValueError("pool names must be unique")
        if self.default_pool not in names:
            raise ValueError(f"default_pool {self.default_pool!r} is not among the pools")
        return self

    def pool_names(self) -> list[str]:
        return [pool.name for pool in self.pools]

    def pool(self, name: str) -> Pool:
        return next(pool for pool in self.pools if pool.name == name)

    @property
    def needs_mx(self) -> bool:
        """True when some provider group is matched by MX host, so routing needs DNS."""
        return any(provider.mx_suffixes for provider in self.providers.values())

    def throttle_key(self, domain: str, mx_hosts: list[str] | None = None) -> str:
        domain = domain.lower()
        for name, provider in self.providers.items():
            if domain in provider.domains:
                return name
        for name, provider in self.providers.items():
            for host in mx_hosts or ():
                if any(_suffix_match(host, s) for s in provider.mx_suffixes):
                    return name
        return domain

    def shaping(self, key: str) -> Shaping:
        """The shaping of a throttle key: its provider or domain rule over the defaults."""
        override: ShapingOverride | None = self.providers.get(key) or self.domains.get(key)
        if override is None:
            return self.defaults
        changes = override.model_dump(exclude_none=True, exclude={"domains", "mx_suffixes"})
        return self.defaults.model_copy(update=changes)


def _suffix_match(host: str, suffix: str) -> bool:
    host, suffix = host.lower().rstrip("."), suffix.lower().strip(".")
    return host == suffix or host.endswith("." + suffix)


class RulesError(ValueError):
    """The rules file is invalid; the message names the file, line and offending entry."""


def load_rules(path: Path | None) -> Rules:
    """Read and validate the rules file; `None` gives the built-in defaults."""
    if path is None:
        return Rules()
    try:
        text = path.read_text()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RulesError(f"{path}: {exc}") from None
    try:
        return Rules.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "(top)"
            line = _line_of(node, error["loc"])
            problems.append(
                f"line {line}: {where}: {error['msg']}" if line else f"{where}: {error['msg']}"
            )
        raise RulesError(f"{path}: " + "; ".join(problems)) from None


def _line_of(node: Any, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line of the YAML node at `loc`, or of its nearest existing parent."""
    if node is None:
        return None
    line: int = node.start_mark.line + 1
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == part), None)
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            child = node.value[part]
        if child is None:
            break
        node, line = child, child.start_mark.line + 1
    return line
