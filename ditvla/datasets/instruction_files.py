"""Files of instructions by task, one ``TASK<TAB>TEXT`` per line: the rewordings that
``ditvla eval --rewordings`` puts to a policy, and the variants that ``ditvla train
--instruction-variants`` trains it on."""

from __future__ import annotations

from pathlib import Path

from ditvla.errors import ConfigError


def read_task_lines(
    path: str | Path, tasks: list[str], *, text: str, tasks_are: str
) -> dict[str, list[str]]:
    """``{task: [text, ...]}`` from ``path``, for ``tasks``; ConfigError naming the file and
    the line for an empty line, a line without a tab or a text, or a task not in ``tasks``
    (``tasks_are`` says what they are: "evaluated", "in the store"); ``text`` names the
    second column in the messages (REWORDING, VARIANT)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{text.lower()}s file {path} does not exist")
    lines: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        task, tab, words = line.partition("\t")
        where = f"{path}:{number}"
        if not line.strip():
            raise ConfigError(f"{where}: empty line; every line is TASK<TAB>{text}")
        if not tab or not words.strip():
            raise ConfigError(f"{where}: expected TASK<TAB>{text}, got {line!r}")
        if task.strip() not in tasks:
            raise ConfigError(
                f"{where}: task {task.strip()!r} is not {tasks_are}; tasks: {', '.join(tasks)}"
            )
        lines.setdefault(task.strip(), []).append(words.strip())
    return lines
