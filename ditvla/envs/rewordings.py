"""Reworded instructions for ``ditvla eval --perturb instruction=LEVEL``.

A policy that has learnt what its instructions mean follows them in other words; one that
has learnt three strings does not. The rewordings keep the meaning: colours, objects'
names that tell objects apart and places are never changed; verbs and the words for what
is handled are replaced by synonyms, and the sentence is framed otherwise. Each episode's
rewording is chosen by its seed (the same episodes get the same words in every run).

- ``small``: the same words, cased and punctuated otherwise;
- ``medium``: one word or phrase replaced by a synonym (the seed chooses which);
- ``large``: every known word or phrase replaced, in another sentence frame;
- ``file``: a user's rewordings, one per line: ``TASK<TAB>REWORDING`` (several lines per
  task: the seed chooses among them); a task the file lacks keeps its instruction.
"""

from __future__ import annotations

import re
from pathlib import Path

from ditvla.datasets.instruction_files import read_task_lines
from ditvla.errors import ConfigError

# phrase -> its synonyms, longest phrases first where one holds another
SYNONYMS: dict[str, tuple[str, ...]] = {
    "pick up": ("grab", "lift"),
    "put": ("place", "set"),
    "place": ("put", "set"),
    "push": ("shove", "slide"),
    "press": ("push down on",),
    "reach": ("touch", "go to"),
    "insert": ("fit",),
    "open": ("pull open",),  # as the first word only (see FIRST_WORD_ONLY)
    "close": ("shut",),
    "slide": ("move",),
    "turn on": ("switch on",),
    "ball": ("sphere",),
    "puck": ("disc",),
    "goal": ("target",),
    "basket": ("hamper",),
    "cabinet": ("cupboard",),
    "stove": ("cooktop",),
}
SURFACES = ("{}.", "{}!", "{} please", "Please {}")
# verbs replaced only where they begin the instruction ("slide the window open" keeps
# its last word)
FIRST_WORD_ONLY = ("open", "close")
FRAMES = ("could you {}?", "your job: {}", "I need you to {}", "now {}, thanks")


def _phrases(text: str) -> list[tuple[int, int, str]]:
    """(start, end, phrase) of the known phrases in ``text``, left to right, not
    overlapping (the longest phrase wins)."""
    found: list[tuple[int, int, str]] = []
    for phrase in sorted(SYNONYMS, key=len, reverse=True):
        for match in re.finditer(rf"\b{re.escape(phrase)}\b", text):
            if phrase in FIRST_WORD_ONLY and match.start() > 0:
                continue
            if all(match.end() <= s or match.start() >= e for s, e, _ in found):
                found.append((match.start(), match.end(), phrase))
    return sorted(found)


def _replaced(text: str, picks: list[tuple[int, int, str]], seed: int) -> str:
    out, last = [], 0
    for number, (start, end, phrase) in enumerate(picks):
        choices = SYNONYMS[phrase]
        out += [text[last:start], choices[(seed + number) % len(choices)]]
        last = end
    return "".join(out) + text[last:]


def reworded(instruction: str, level: str, seed: int) -> str:
    """``instruction`` reworded at ``level`` (small, medium or large) for episode ``seed``."""
    text = instruction.strip().rstrip(".!").lower()
    if level == "small":
        form = SURFACES[seed % len(SURFACES)]
        return form.format(text[:1].upper() + text[1:] if form.startswith("{}") else text)
    phrases = _phrases(text)
    if level == "medium":
        if not phrases:  # nothing known to replace: the surface form instead
            return reworded(instruction, "small", seed)
        return _replaced(text, [phrases[seed % len(phrases)]], seed)
    if level == "large":
        return FRAMES[seed % len(FRAMES)].format(_replaced(text, phrases, seed))
    raise ConfigError(f"unknown rewording level {level!r}; levels: small, medium, large, file")


def read_rewordings(path: str | Path, tasks: list[str]) -> dict[str, list[str]]:
    """A user's rewordings file: ``TASK<TAB>REWORDING`` per line, for the evaluated
    ``tasks`` (:func:`~ditvla.datasets.instruction_files.read_task_lines`)."""
    return read_task_lines(path, tasks, text="REWORDING", tasks_are="evaluated")
