"""Resolve names across the modules of the tree: imports (absolute and relative), ``as`` renames,
re-exports through ``__init__.py``, star imports and module-level aliases ``X = Y``.

Everything is resolved to a class key (``module.Class``) defined in the tree, to a module of the tree,
or to an external dotted name (``abc.ABC``, ``Exception``). Chains are followed with a visited set, so
circular imports and ``A = B; B = A`` end instead of looping.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.discover.model import Alias, ClassInfo, ModuleInfo

_MAX_DEPTH = 64


@dataclass(slots=True, frozen=True)
class Resolved:
    kind: str      # class | module | external | unknown
    target: str

    @property
    def is_class(self) -> bool:
        return self.kind == "class"


_UNKNOWN = Resolved("unknown", "")


class Resolver:
    def __init__(self, modules: dict[str, ModuleInfo], module_prefix: str = "") -> None:
        self.modules = modules
        self.prefix = module_prefix
        # the tree may import itself without its parent packages ("agent_backend.x" for "examples.agent_backend.x")
        self._short_root = module_prefix.rsplit(".", 1)[-1] if "." in module_prefix else ""

    def module(self, name: str) -> ModuleInfo | None:
        found = self.modules.get(name)
        if found is None and self._short_root and (name == self._short_root or name.startswith(self._short_root + ".")):
            found = self.modules.get(self.prefix.rsplit(".", 1)[0] + "." + name)
        return found

    def resolve(self, module: str, expr: str) -> Resolved:
        """What ``expr`` (a dotted name as written in ``module``) refers to."""
        return self._dotted(module, expr, set(), 0)

    def class_key(self, module: str, expr: str) -> str:
        resolved = self.resolve(module, expr)
        return resolved.target if resolved.is_class else ""

    def _dotted(self, module: str, expr: str, seen: set[tuple[str, str]], depth: int) -> Resolved:
        head, *rest = expr.split(".")
        current = self._symbol(module, head, seen, depth)
        for attr in rest:
            current = self._attribute(current, attr, seen, depth)
        return current

    def _attribute(self, current: Resolved, attr: str, seen: set[tuple[str, str]], depth: int) -> Resolved:
        if current.kind == "module":
            submodule = self.module(f"{current.target}.{attr}")
            if submodule is not None:
                return Resolved("module", submodule.name)
            return self._symbol(current.target, attr, seen, depth)
        if current.kind == "external":
            return Resolved("external", f"{current.target}.{attr}")
        return _UNKNOWN   # attributes of classes (nested classes) are not indexed

    def _symbol(self, module: str, name: str, seen: set[tuple[str, str]], depth: int) -> Resolved:
        info = self.module(module)
        if info is None:
            return Resolved("external", f"{module}.{name}" if module else name)
        if (info.name, name) in seen or depth > _MAX_DEPTH:
            return _UNKNOWN
        seen.add((info.name, name))
        binding = info.bindings.get(name)
        if binding is None:
            return self._unbound(info, name, seen, depth)
        if binding.kind == "class":
            return Resolved("class", f"{info.name}.{binding.target}")
        if binding.kind == "module":
            known = self.module(binding.target)
            return Resolved("module", known.name) if known else Resolved("external", binding.target)
        if binding.kind == "from":
            known = self.module(binding.target)
            if known is None:
                return Resolved("external", f"{binding.target}.{binding.attr}" if binding.target else binding.attr)
            submodule = self.module(f"{known.name}.{binding.attr}")
            if submodule is not None and binding.attr not in known.bindings:
                return Resolved("module", submodule.name)
            return self._symbol(known.name, binding.attr, seen, depth + 1)
        return self._dotted(info.name, binding.target, seen, depth + 1)   # alias X = Y

    def _unbound(self, info: ModuleInfo, name: str, seen: set[tuple[str, str]], depth: int) -> Resolved:
        submodule = self.module(f"{info.name}.{name}")
        if submodule is not None:
            return Resolved("module", submodule.name)
        if not name.startswith("_"):   # star imports never bring private names
            for source in info.star_imports:
                if self.module(source) is not None:
                    found = self._symbol(source, name, seen, depth + 1)
                    if found.kind in ("class", "module"):
                        return found
        return Resolved("external", name)   # a builtin (object, Exception) or a name we cannot see

    # -- whole-tree passes --------------------------------------------------------------------------

    def resolve_bases(self) -> None:
        for info in self.modules.values():
            for cls in info.classes.values():
                cls.resolved_bases = [self._base_key(info.name, base) for base in cls.bases]

    def _base_key(self, module: str, base: str) -> str:
        resolved = self.resolve(module, base)
        return resolved.target if resolved.kind in ("class", "external") else base

    def aliases(self) -> list[Alias]:
        """Public names bound to an in-tree class under another name: ``X = Y`` or ``import Y as X``."""
        found: list[Alias] = []
        for info in self.modules.values():
            for name, binding in info.bindings.items():
                if binding.kind not in ("alias", "from") or name.startswith("_") or binding.type_only:
                    continue   # an import under ``if TYPE_CHECKING:`` names nothing at run time
                if binding.kind == "from" and binding.attr == name:
                    continue   # a plain re-export keeps the name: not a second name
                target = self.class_key(info.name, name)
                if target and target.rsplit(".", 1)[-1] != name:
                    how = "assignment" if binding.kind == "alias" else "import-as"
                    found.append(Alias(f"{info.name}.{name}", target, how))
        return sorted(found, key=lambda alias: alias.name)


def class_index(modules: dict[str, ModuleInfo]) -> dict[str, ClassInfo]:
    return {cls.key: cls for info in modules.values() for cls in info.classes.values()}


def ancestors(key: str, classes: dict[str, ClassInfo]) -> list[str]:
    """In-tree ancestors, nearest first (breadth-first; cycles and external bases are ignored)."""
    order: list[str] = []
    queue = list(classes[key].resolved_bases) if key in classes else []
    seen = {key}
    while queue:
        base = queue.pop(0)
        if base in seen or base not in classes:
            continue
        seen.add(base)
        order.append(base)
        queue.extend(classes[base].resolved_bases)
    return order


def all_methods(key: str, classes: dict[str, ClassInfo]) -> dict[str, str]:
    """Method name -> key of the class that defines it, own methods winning over inherited ones."""
    found: dict[str, str] = {}
    for owner in [key, *ancestors(key, classes)]:
        for name in classes[owner].methods:
            found.setdefault(name, owner)
    return found
