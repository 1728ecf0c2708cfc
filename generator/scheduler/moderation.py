"""Prompt moderation: a word/phrase list matched so that the usual evasions do not get through.

The list comes from ``[admin] blocked_words`` plus the file named by ``[moderation] blocklist_file`` (one
word or phrase a line, ``#`` starts a comment), re-read when the file changes (no restart needed).

Matching is whole-word (an innocent word that merely contains a blocked one, like "class" for "ass", passes)
and survives: case, accents (NFKD, combining marks dropped), look-alike letters (Cyrillic/Greek letters
that look Latin; fullwidth forms through NFKD), separators between letters ("b a d", "b.a.d") and
leetspeak ("@$$", "b4d"). Each entry becomes one regular expression over the normalised prompt.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from turbobot.config import POLICIES

if TYPE_CHECKING:
    from turbobot.config import Settings

__all__ = ["POLICIES", "WordList", "word_list"]

log = logging.getLogger("turbobot.moderation")

# Look-alike letters (after casefolding) -> the Latin letter they imitate.
_CONFUSABLES = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d", "ԛ": "q", "ԝ": "w",
    "һ": "h", "ɡ": "g", "ո": "n", "ս": "u",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x", "γ": "y", "ω": "w", "μ": "u", "ς": "s", "σ": "o",
    # Latin odds and ends NFKD leaves alone
    "ı": "i", "ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ŧ": "t", "ß": "ss", "æ": "ae", "œ": "oe",
})

# A letter of an entry and the characters that may stand for it in a prompt (leetspeak).
_LEET: dict[str, str] = {
    "a": "a4@^", "b": "b8", "e": "e3€", "g": "g9", "i": "i1!|", "l": "l1|", "o": "o0", "s": "s5$", "t": "t7+",
    "z": "z2",
}
# Between the letters of an entry: up to four characters that are neither letters, digits nor leet symbols.
_GAP = r"(?:[^\w@$^€]|_){0,4}"
# Whole words: the match may not touch a letter or digit on either side.
_BEFORE = r"(?<![^\W_])"
_AFTER = r"(?![^\W_])"


def normalise(text: str) -> str:
    """Casefolded, accents stripped, look-alikes mapped to Latin letters (fullwidth forms through NFKD)."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return stripped.casefold().translate(_CONFUSABLES)


def _letter_class(ch: str) -> str:
    alts = _LEET.get(ch, ch)
    return "[" + "".join(re.escape(c) for c in alts) + "]" if len(alts) > 1 else re.escape(ch)


def compile_entry(entry: str) -> re.Pattern[str] | None:
    """The pattern for one list entry, or None when it holds no letter or digit."""
    norm = normalise(entry)
    chars = [ch for ch in norm if ch.isalnum()]
    if not chars:
        return None
    return re.compile(_BEFORE + _GAP.join(_letter_class(ch) for ch in chars) + _AFTER)


def parse_list(text: str) -> list[str]:
    """Lines of a list file: blank lines and ``#`` comments are skipped."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


@dataclass
class WordList:
    """Fixed entries plus an optional file, re-read whenever its modification time or size changes."""

    fixed: tuple[str, ...] = ()
    path: Path | None = None
    _stamp: tuple[int, int] | None = None
    _patterns: list[tuple[str, re.Pattern[str]]] = field(default_factory=list)
    _loaded: bool = False

    def _compile(self, entries: Iterable[str]) -> list[tuple[str, re.Pattern[str]]]:
        out = []
        for entry in entries:
            pattern = compile_entry(entry)
            if pattern is not None:
                out.append((entry, pattern))
        return out

    def _refresh(self) -> None:
        stamp: tuple[int, int] | None = None
        if self.path is not None:
            try:
                st = self.path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamp = None
        if self._loaded and stamp == self._stamp:
            return
        entries = list(self.fixed)
        if self.path is not None and stamp is not None:
            try:
                entries += parse_list(self.path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                log.warning("cannot read the word list %s: %s; keeping the previous list", self.path, exc)
                return
            if self._loaded:
                log.info("word list %s changed: %d entries", self.path, len(entries))
        elif self.path is not None:
            log.warning("the word list %s does not exist; only the configured words apply", self.path)
        self._patterns = self._compile(entries)
        self._stamp = stamp
        self._loaded = True

    def match(self, text: str) -> str | None:
        """The first entry found in ``text``, or None."""
        self._refresh()
        if not self._patterns:
            return None
        norm = normalise(text)
        for entry, pattern in self._patterns:
            if pattern.search(norm):
                return entry
        return None

    def __len__(self) -> int:
        self._refresh()
        return len(self._patterns)


def word_list(fixed: Iterable[str], settings: Settings, path: str) -> WordList:
    """``fixed`` words plus the file at ``path`` (relative to the config file's folder; "" = none)."""
    return WordList(fixed=tuple(fixed), path=settings.path(path).resolve() if path else None)
