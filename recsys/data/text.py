"""User text from a history: the N most recent item texts, most recent first, joined with " | "."""
from __future__ import annotations

from typing import Sequence

SEPARATOR = " | "


def user_text(item_texts: Sequence[str], history: Sequence[int], n: int) -> str:
    """Text of a user whose history (oldest first) is `history`; empty history gives an empty string."""
    return SEPARATOR.join(item_texts[int(i)] for i in list(history)[::-1][:n])
