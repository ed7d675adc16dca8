"""Classify an SMTP failure into a category and a hard/soft verdict, by rules kept as data.

The rules live in ``classification_rules.yaml`` (its header documents the format and the order
of evaluation); operators can put their own file in front of them with :func:`load_rules`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from schemas.categories import ADDRESS_CATEGORIES, Category

BUILTIN_RULES_PATH = Path(__file__).with_name("classification_rules.yaml")

#: Rule id given when no rule matched.
DEFAULT_RULE_ID = "default"

_RULE_KEYS = frozenset(
    {"id", "category", "enhanced", "code", "text", "hard", "veto", "description"}
)
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_ENHANCED_PATTERN_RE = re.compile(r"^([245x])\.(\d{1,3})\.(\d{1,3}|x)$")
_CODE_PATTERN_RE = re.compile(r"^([245])(\d\d|xx)$")
_ENHANCED_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
# One line of a reply as servers write it: "550-5.1.1 text" or "550 5.1.1 text" or "550 text".
_LINE_PREFIX_RE = re.compile(r"^\s*([245]\d\d)(?:[ -]|$)\s*(?:([245]\.\d{1,3}\.\d{1,3})(?:\s|$))?")
_BARE_ENHANCED_RE = re.compile(r"^\s*#?([245]\.\d{1,3}\.\d{1,3})(?:\s|$)")

_STAGE_ENHANCED, _STAGE_TEXT, _STAGE_CODE = 0, 1, 2


@dataclass(frozen=True)
class Classification:
    """Outcome of classifying one failure; ``rule`` is the id of the rule that matched."""

    category: Category
    hard: bool
    rule: str


@dataclass(frozen=True)
class Reply:
    """An SMTP reply split into basic code, enhanced code and text (whitespace collapsed)."""

    code: int | None
    enhanced: str | None
    text: str


def parse_reply(text: str) -> Reply:
    """Split a possibly multi-line reply such as ``550-5.1.1 foo\\n550 5.1.1 bar``.

    The code and enhanced code come from the first line; the same prefixes are removed from
    every line and the rest joined by single spaces.
    """
    code: int | None = None
    enhanced: str | None = None
    parts: list[str] = []
    for i, line in enumerate(text.strip().splitlines()):
        m = _LINE_PREFIX_RE.match(line)
        if m is not None and (i == 0 or int(m.group(1)) == code):
            code = int(m.group(1))
            enhanced = enhanced or m.group(2)
            line = line[m.end() :]
        elif i == 0 and (bare := _BARE_ENHANCED_RE.match(line)) is not None:
            enhanced = bare.group(1)
            line = line[bare.end() :]
        parts.append(line)
    joined = " ".join(" ".join(parts).split())
    if code is not None:
        # A folded header joins "550-5.1.1 a\n 550 5.1.1 b" into one line: drop the repeats.
        if enhanced:
            enh = re.escape(enhanced)
            repeat = rf"(?<!\S){code}(?:-(?:{enh}(?: |$))?| {enh}(?: |$))"
        else:
            repeat = rf"(?<!\S){code}-"
        joined = " ".join(re.sub(repeat, " ", joined).split())
    return Reply(code, enhanced, joined)


def _enhanced_parts(enhanced: str | None) -> tuple[str, str, str] | None:
    m = _ENHANCED_RE.match(enhanced.strip()) if enhanced else None
    if m is None:
        return None
    cls, subject, detail = m.groups()
    return cls, str(int(subject)), str(int(detail))


@dataclass(frozen=True)
class Rule:
    """One classification rule; every condition that is set must match."""

    id: str
    category: Category
    enhanced: tuple[str, str, str] | None = None
    code: str | None = None
    text: re.Pattern[str] | None = None
    soft: bool = False
    veto: bool = False

    @property
    def stage(self) -> int:
        if self.enhanced is not None:
            return _STAGE_ENHANCED
        return _STAGE_TEXT if self.text is not None else _STAGE_CODE

    @property
    def wildcard(self) -> bool:
        """True for class+subject rules ("5.7.x") and class rules ("5xx")."""
        if self.enhanced is not None:
            return self.enhanced[2] == "x"
        return self.text is None and self.code is not None and self.code.endswith("xx")

    def matches(self, code: int | None, enhanced: tuple[str, str, str] | None, text: str) -> bool:
        if self.enhanced is not None:
            if enhanced is None:
                return False
            if any(
                want not in ("x", got) for want, got in zip(self.enhanced, enhanced, strict=True)
            ):
                return False
        if self.code is not None:
            if code is not None:
                have = str(code)
            elif enhanced is not None:
                have = enhanced[0] + "xx"
            else:
                return False
            if self.code != have and not (self.code.endswith("xx") and self.code[0] == have[0]):
                return False
        return self.text is None or self.text.search(text) is not None


class Classifier:
    """An ordered rule set: enhanced-code rules, then text rules, then basic-code rules."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        indexed = list(enumerate(rules))
        indexed.sort(key=lambda ir: (ir[1].stage, ir[1].wildcard, ir[0]))
        self.rules: tuple[Rule, ...] = tuple(rule for _, rule in indexed)
        self._vetoes = tuple(rule for rule in self.rules if rule.veto)

    def classify(self, code: int | None, enhanced: str | None, text: str) -> Classification:
        """Classify a failure. Code and enhanced code are taken from ``text`` when not given."""
        reply = parse_reply(text or "")
        if code is None or not 200 <= code <= 599:
            code = reply.code
        parts = _enhanced_parts(enhanced) or _enhanced_parts(reply.enhanced)
        basic_class = str(code)[0] if code is not None else (parts[0] if parts else None)
        for rule in self.rules:
            if not rule.matches(code, parts, reply.text):
                continue
            chosen = rule
            if rule.category in ADDRESS_CATEGORIES:
                vetoes = (v for v in self._vetoes if v.matches(code, parts, reply.text))
                chosen = next(vetoes, rule)
            return Classification(
                chosen.category, basic_class == "5" and not chosen.soft, chosen.id
            )
        return Classification(Category.OTHER, basic_class == "5", DEFAULT_RULE_ID)


def suppresses(c: Classification) -> bool:
    """True when the failure says the address itself is bad, so it must never be mailed again."""
    return c.hard and c.category in ADDRESS_CATEGORIES


def _compile_text(rule_id: str, value: object) -> re.Pattern[str]:
    alternatives = [value] if isinstance(value, str) else value
    if not isinstance(alternatives, list) or not alternatives:
        raise ValueError(f"rule {rule_id!r}: text must be a regex or a non-empty list of regexes")
    for alt in alternatives:
        if not isinstance(alt, str) or not alt:
            raise ValueError(f"rule {rule_id!r}: text alternatives must be non-empty strings")
        try:
            re.compile(alt)
        except re.error as exc:
            raise ValueError(f"rule {rule_id!r}: invalid text regex {alt!r}: {exc}") from exc
    return re.compile("|".join(f"(?:{alt})" for alt in alternatives), re.IGNORECASE)


def parse_rule(raw: object, where: str) -> Rule:
    """Validate one rule mapping; raises ValueError naming the rule."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: a rule must be a mapping, got {type(raw).__name__}")
    rule_id = raw.get("id")
    if not isinstance(rule_id, str) or not _ID_RE.match(rule_id):
        raise ValueError(f"{where}: rule id {rule_id!r} must match {_ID_RE.pattern}")
    name = f"rule {rule_id!r} ({where})"
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise ValueError(f"{name}: unknown keys {sorted(unknown)}")
    try:
        category = Category(str(raw.get("category")))
    except ValueError:
        allowed = ", ".join(c.value for c in Category)
        raise ValueError(f"{name}: category must be one of {allowed}") from None
    enhanced: tuple[str, str, str] | None = None
    if "enhanced" in raw:
        m = _ENHANCED_PATTERN_RE.match(str(raw["enhanced"]))
        if m is None:
            raise ValueError(f"{name}: enhanced must look like 5.1.1, x.1.1 or 5.7.x")
        cls, subject, detail = m.groups()
        enhanced = (cls, str(int(subject)), detail if detail == "x" else str(int(detail)))
    code: str | None = None
    if "code" in raw:
        code = str(raw["code"])
        if not _CODE_PATTERN_RE.match(code):
            raise ValueError(f"{name}: code must look like 550 or 5xx")
    text = _compile_text(rule_id, raw["text"]) if "text" in raw else None
    if enhanced is None and code is None and text is None:
        raise ValueError(f"{name}: needs at least one of enhanced, text, code")
    if raw.get("hard", False) is not False:
        raise ValueError(f"{name}: hard may only be false (a rule can keep a 5xx soft)")
    veto = raw.get("veto", False)
    if not isinstance(veto, bool):
        raise ValueError(f"{name}: veto must be true or false")
    if veto and (text is None or enhanced is not None or code is not None):
        raise ValueError(f"{name}: a veto rule has text and nothing else")
    if veto and category in ADDRESS_CATEGORIES:
        raise ValueError(f"{name}: a veto rule cannot have an address category")
    return Rule(rule_id, category, enhanced, code, text, soft="hard" in raw, veto=veto)


def _read_rules(path: Path) -> list[Rule]:
    try:
        doc: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read rules: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list):
        raise ValueError(f"{path}: expected a mapping with a 'rules' list")
    rules = [parse_rule(raw, f"{path} #{i}") for i, raw in enumerate(doc["rules"], 1)]
    _check_unique(rules, path)
    return rules


def _check_unique(rules: Iterable[Rule], path: Path) -> None:
    seen: set[str] = set()
    for rule in rules:
        if rule.id in seen:
            raise ValueError(f"rule {rule.id!r} ({path}): duplicate id")
        seen.add(rule.id)


def load_rules(path: str | Path | None = None) -> Classifier:
    """Build a classifier from the operator's rules file (optional) followed by the built-in rules.

    An operator rule wins over a built-in rule of the same step; one with a built-in rule's id
    replaces that rule. Invalid rules raise ValueError naming the rule.
    """
    builtin = _read_rules(BUILTIN_RULES_PATH)
    if path is None:
        return Classifier(builtin)
    operator = _read_rules(Path(path))
    replaced = {rule.id for rule in operator}
    return Classifier([*operator, *(rule for rule in builtin if rule.id not in replaced)])


#: The built-in rules, loaded once at import.
DEFAULT_CLASSIFIER = load_rules()


def classify(code: int | None, enhanced: str | None, text: str) -> Classification:
    """Classify with the built-in rules (see :class:`Classifier.classify`)."""
    return DEFAULT_CLASSIFIER.classify(code, enhanced, text)
