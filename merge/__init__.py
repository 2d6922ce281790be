"""Suture's core library: tensor stores, the streaming writer, model graphs, alignment engines and merge methods.

Importing this package is cheap: submodules (and torch) load only when used, so `suture --help` stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"
