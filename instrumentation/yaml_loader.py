"""A YAML loader that refuses a key given twice in one mapping.

``yaml.safe_load`` keeps the last of two equal keys and drops the first without a word: a second
role of the same name in a path map replaces the first, a second ``alerting:`` section in the
sidecar's configuration replaces the first one (and can switch paging off unseen). The path map
(``instrumentation.pathmap``) and the sidecar's configuration (``sidecar.config``) both load with
``UniqueKeyLoader``. PyYAML only: the sidecar imports this module without the instrumentation's
runtime.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """``key`` is given twice in one mapping: again at ``problem_mark``, first at ``first_mark``;
    ``key_path`` is where the mapping is in the document (``("alerting", "min_severity")``)."""

    def __init__(self, key: Any, key_path: tuple[Any, ...], first_mark: yaml.Mark,
                 mark: yaml.Mark, mapping_mark: yaml.Mark) -> None:
        super().__init__("while constructing a mapping", mapping_mark, f"duplicate key {key!r}", mark)
        self.key = key
        self.key_path = key_path
        self.first_mark = first_mark


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (``DuplicateKeyError``).
    Keys merged in with ``<<: *anchor`` may be given again: that is how a merge is overridden."""

    _root: yaml.Node | None = None

    def construct_document(self, node: yaml.Node) -> Any:
        self._root = node
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: the base constructor reports it
            if first is not key_node:
                path = (*_path_to(self._root, node), key)
                raise DuplicateKeyError(key, path, first.start_mark, key_node.start_mark,
                                        node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _path_to(root: yaml.Node | None, target: yaml.Node) -> tuple[Any, ...]:
    """The keys (scalar values) and list indexes leading from ``root`` to ``target``; ``()`` when
    it is the root or cannot be found. Aliases may share nodes, or contain themselves: each node is
    visited once."""
    stack: list[tuple[yaml.Node, tuple[Any, ...]]] = [(root, ())] if root is not None else []
    visited: set[int] = set()
    while stack:
        current, path = stack.pop()
        if current is target:
            return path
        if id(current) in visited:
            continue
        visited.add(id(current))
        if isinstance(current, yaml.MappingNode):
            stack.extend((value, (*path, key.value if isinstance(key, yaml.ScalarNode) else "?"))
                         for key, value in current.value)
        elif isinstance(current, yaml.SequenceNode):
            stack.extend((item, (*path, index)) for index, item in enumerate(current.value))
    return ()
