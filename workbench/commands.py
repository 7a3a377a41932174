"""Command palette (ctrl+p): every keyed action of the current screen, by name.

The commands are read from the active bindings, so a screen added later gets
its actions into the palette by declaring them in ``BINDINGS`` with a
description; nothing to register here.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.dom import DOMNode


class WorkbenchCommands(Provider):
    def _commands(self) -> Iterator[tuple[str, str, DOMNode, Binding]]:
        """(name, help, node, binding) for each described, enabled binding."""
        seen: set[str] = set()
        for active in self.screen.active_bindings.values():
            binding = active.binding
            if not binding.description or not active.enabled or binding.action in seen:
                continue
            seen.add(binding.action)
            key = self.app.get_key_display(binding)
            name = binding.tooltip or binding.description
            yield name, f"key {key}", active.node, binding

    async def discover(self) -> Hits:
        for name, help_text, node, binding in self._commands():
            yield DiscoveryHit(name, partial(self._run, node, binding.action), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, node, binding in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), partial(self._run, node, binding.action),
                          text=name, help=help_text)

    async def _run(self, node: DOMNode, action: str) -> None:
        await node.run_action(action)
