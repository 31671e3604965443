"""Warnings that stay readable under load: each kind of warning is shown a few times per run, the
rest are counted and summarised once at the end.

A guest that writes 50 MB to unclaimed addresses would otherwise print millions of lines; what a
user needs is the first few (which say where and what) and how many followed. A "kind" is the
message's format string, so ``unclaimed mmio write of %d bytes at %#x`` is one kind whatever the
address. Installed on the command line's log handler; library users keep every record.
"""
from __future__ import annotations

import logging


class WarningBudget(logging.Filter):
    def __init__(self, per_kind: int = 10) -> None:
        super().__init__()
        self.per_kind = per_kind
        self.seen: dict[str, int] = {}
        self.example: dict[str, str] = {}       # the first warning of each kind that was not shown

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.levelno >= logging.ERROR:
            return True
        key = str(record.msg)
        n = self.seen.get(key, 0) + 1
        if n > self.per_kind and len(self.seen) >= 4096 and key not in self.seen:
            return False                    # an unbounded variety of kinds: count nothing more
        self.seen[key] = n
        if n == self.per_kind + 1:
            self.example[key] = record.getMessage()
        if n == self.per_kind:
            record.msg = f"{record.msg} (further warnings like this are counted, not shown)"
        return n <= self.per_kind

    def summary(self) -> list[str]:
        """One line per kind that was cut short."""
        return [f"{n - self.per_kind} more warning(s) like: {self.example.get(key, key)}"
                for key, n in self.seen.items() if n > self.per_kind]
