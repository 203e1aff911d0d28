"""Offline training text: the docstrings of Python's own standard library.

No download, the same bytes for a given Python version, and real English prose mixed
with code examples: enough for a character-level model to learn something in seconds.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

import torch

#: Standard-library modules whose docstrings make the corpus (pure-Python, always present).
MODULES = (
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "gettext",
    "glob",
    "heapq",
    "html",
    "http.client",
    "inspect",
    "io",
    "ipaddress",
    "json",
    "logging",
    "mailbox",
    "operator",
    "optparse",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "shutil",
    "socket",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
)


def corpus_text(max_chars: int = 400_000) -> str:
    """Concatenated docstrings of `MODULES` and their public members, in a fixed order."""
    parts: list[str] = []
    for name in MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            with warnings.catch_warnings():  # e.g. typing.io warns that it is deprecated
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(getattr(module, attr, None))
            if doc and len(doc) > 80:
                parts.append(doc)
    text = "\n\n".join(p for p in parts if p)
    return text[:max_chars]


class CharCorpus:
    """Character-level tokens of a text, with a fixed vocabulary.

    Example:
        >>> c = CharCorpus("hello world")
        >>> c.vocab_size, c.decode(c.encode("hello"))
        (8, 'hello')
    """

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {ch: i for i, ch in enumerate(self.chars)}
        self.tokens = torch.tensor([self.index[ch] for ch in text], dtype=torch.long)

    @property
    def vocab_size(self) -> int:
        """Distinct characters."""
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Characters to token ids."""
        return [self.index[ch] for ch in text]

    def decode(self, ids: list[int]) -> str:
        """Token ids to characters."""
        return "".join(self.chars[i] for i in ids)
