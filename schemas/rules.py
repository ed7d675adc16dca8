"""The rules file (`MAILRAIL_RULES`): IP pools and per-destination delivery rules."""

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

_Name = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[a-z0-9][a-z0-9-]*$")]


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Pool(_Rule):
    name: _Name
    ehlo: str = "mailrail.localhost"
    source_addresses: list[str] = Field(default_factory=list)


class Shaping(_Rule):
    """How fast and how wide one destination (domain or provider group) may be mailed."""

    messages_per_s: float | None = Field(default=None, gt=0)
    max_connections: int = Field(default=10, ge=1, le=1000)
    max_messages_per_connection: int = Field(default=100, ge=1)
    max_recipients_per_batch: int = Field(default=50, ge=1, le=1000)
    tls: Literal["opportunistic", "required", "disabled"] = "opportunistic"


class Rules(_Rule):
    default_pool: _Name = "default"
    bounce_domain: str = "bounces.mailrail.localhost"
    pools: list[Pool] = Field(default_factory=lambda: [Pool(name="default")], min_length=1)
    defaults: Shaping = Field(default_factory=Shaping)
    domains: dict[str, Shaping] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _default_pool_exists(self) -> "Rules":
        if self.default_pool not in self.pool_names():
            raise ValueError(f"default_pool {self.default_pool!r} is not among the pools")
        return self

    def pool_names(self) -> list[str]:
        return [pool.name for pool in self.pools]

    def pool(self, name: str) -> Pool:
        return next(pool for pool in self.pools if pool.name == name)

    def shaping(self, domain: str) -> Shaping:
        return self.domains.get(domain, self.defaults)


class RulesError(ValueError):
    """The rules file is invalid; the message names the file and the offending entry."""


def load_rules(path: Path | None) -> Rules:
    """Read and validate the rules file; `None` gives the built-in defaults."""
    if path is None:
        return Rules()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RulesError(f"{path}: {exc}") from None
    try:
        return Rules.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise RulesError(f"{path}: {problems}") from None
