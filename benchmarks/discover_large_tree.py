"""How fast and how lean is `pathwatch discover` on a large, messy source tree?

Generates a deterministic tree (seeded) in a temp dir: deep packages, engines/emitters/managers among
many ordinary classes, relative imports, re-exports in __init__.py, module-level aliases, some files
that do not parse, some that are not UTF-8, a symlink loop and a few oversized files. Then runs
discovery in a fresh child process (so its peak RSS is its own) and prints files/s, wall time, peak
RSS, and, in a second run, the tracemalloc peak of the Python heap.

    .venv/bin/python benchmarks/discover_large_tree.py [--files 5000] [--seed 7] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ROLE_SUFFIXES = ["ExecutionEngine", "Executor", "Supervisor", "Orchestrator", "Emitter", "Notifier",
                 "Bridge", "WebSocketManager"]
PLAIN_SUFFIXES = ["Repository", "Service", "Helper", "Config", "Client", "Cache", "Parser", "Model"]
PREFIXES = ["User", "Request", "Legacy", "Unified", "Isolated", "Core", "Fast", "Async", "Batch", "Chat"]
VERBS = ["load", "save", "fetch", "build", "parse", "render", "compute", "flush", "track", "scan"]
OBJECTS = ["item", "user", "run", "thread", "tool", "report", "batch", "event", "record", "page"]


def _method(rng: random.Random, name: str, params: str) -> str:
    prefix = "async def" if rng.random() < 0.5 else "def"
    body = "        yield None\n" if rng.random() < 0.1 else "        return None\n"
    return f"    {prefix} {name}(self, {params}):\n{body}\n"


def _role_class(rng: random.Random, name: str, suffix: str, base: str) -> str:
    lines = [f"class {name}({base}):\n" if base else f"class {name}:\n",
             "    def __init__(self, user_context, manager=None):\n",
             "        self.user_context = user_context\n        self.manager = manager\n\n"]
    if "Emitter" in suffix or "Notifier" in suffix or "Bridge" in suffix:
        events = rng.sample(["agent_started", "agent_thinking", "tool_executing", "tool_completed",
                             "agent_completed", "agent_error"], k=rng.randint(2, 6))
        lines += [_method(rng, f"notify_{event}", "run_id, payload=None, user_context=None") for event in events]
    elif "Manager" in suffix:
        lines += [_method(rng, "send_to_user", "user_id, message"), _method(rng, "send_to_thread", "thread_id, message")]
    else:
        lines += [_method(rng, "execute_agent", "context, user_context=None"),
                  _method(rng, "execute_pipeline", "steps, context, user_context=None")]
    if rng.random() < 0.1:
        lines.append("    def close(self):\n        import warnings\n"
                     "        warnings.warn('old', DeprecationWarning)\n\n")
    return "".join(lines)


def _plain_class(rng: random.Random, name: str) -> str:
    methods = {f"{rng.choice(VERBS)}_{rng.choice(OBJECTS)}" for _ in range(rng.randint(1, 6))}
    return f"class {name}:\n" + "".join(_method(rng, m, "value") for m in sorted(methods))


def _module_text(rng: random.Random, index: int, depth: int, known: list[tuple[str, str]]) -> tuple[str, list[str]]:
    parts = ['"""generated module %d"""\n' % index, "import os\n"]
    if known and rng.random() < 0.5:
        module, cls = rng.choice(known)
        dots = "." * rng.randint(1, depth + 1)
        parts.append(f"from {dots}{module.rsplit('.', 1)[-1]} import {cls} as Imported{index}\n")
    names = []
    for k in range(rng.randint(1, 4)):
        if rng.random() < 0.15:
            suffix = rng.choice(ROLE_SUFFIXES)
            name = f"{rng.choice(PREFIXES)}{index}x{k}{suffix}"
            base = f"Imported{index}" if f"Imported{index}" in parts[-1] and rng.random() < 0.3 else ""
            parts.append("\n\n" + _role_class(rng, name, suffix, base))
        else:
            name = f"{rng.choice(PREFIXES)}{index}x{k}{rng.choice(PLAIN_SUFFIXES)}"
            parts.append("\n\n" + _plain_class(rng, name))
        names.append(name)
    if rng.random() < 0.2:
        parts.append(f"\n\nAlias{index} = {names[0]}\n")
    return "".join(parts), names


def generate(root: Path, files: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    stats = {"files": 0, "unparsable": 0, "non_utf8": 0, "oversized": 0, "packages": 0}
    packages = [root]
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    stats["files"] = 1
    known: list[tuple[str, str]] = []
    while stats["files"] < files:
        if rng.random() < 0.08 or len(packages) < 3:
            parent = rng.choice(packages)
            if len(parent.relative_to(root).parts) < 8:
                package = parent / f"pkg{len(packages)}"
                package.mkdir()
                (package / "__init__.py").write_text("")
                packages.append(package)
                stats["packages"] += 1
                stats["files"] += 1
                continue
        package = rng.choice(packages)
        depth = len(package.relative_to(root).parts)
        index = stats["files"]
        path = package / f"m{index}.py"
        roll = rng.random()
        if roll < 0.01:
            path.write_text("def broken(:\n    pass\n")
            stats["unparsable"] += 1
        elif roll < 0.015:
            path.write_bytes('X = "caf\xe9"\n\nclass Latin%dEngine:\n    def execute_agent(self, context):\n'
                             '        return 1\n'.encode("latin-1") % index)
            stats["non_utf8"] += 1
        elif roll < 0.016:
            path.write_text("X = 1\n" * 600_000)   # 3.6 MB: above the default size cap
            stats["oversized"] += 1
        else:
            text, names = _module_text(rng, index, depth, known)
            path.write_text(text)
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            known.extend((module, name) for name in names[:1])
            if rng.random() < 0.1:   # a re-export (named or star) in the package's __init__
                line = f"from .m{index} import *\n" if rng.random() < 0.3 else f"from .m{index} import {names[0]}\n"
                with open(package / "__init__.py", "a") as handle:
                    handle.write(line)
        stats["files"] += 1
    os.symlink("..", packages[-1] / "loop")
    return stats


def child(tree: str, trace: bool) -> None:
    if trace:
        import tracemalloc
        tracemalloc.start()
    from sidecar.discover import discover, render_yaml

    started = time.perf_counter()
    found = discover(tree)
    text = render_yaml(found)
    wall = time.perf_counter() - started
    out = {"wall_s": wall, "modules": found.files_read, "skipped": len(found.skipped),
           "classes": len(found.classes), "aliases": len(found.aliases),
           "roles": {role.name: len(role.members) for role in found.roles},
           "candidate_groups": len(found.candidate_groups), "yaml_bytes": len(text),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if trace:
        out["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    print(json.dumps(out))


def run_child(tree: Path, trace: bool) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(tree)] + (["--trace"] if trace else []),
                          capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", metavar="DIR", help="generate into DIR and keep it")
    parser.add_argument("--child", metavar="TREE", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.trace)
        return
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pathwatch-discover-bench-"))
    try:
        tree = base / "bigapp"
        started = time.perf_counter()
        stats = generate(tree, args.files, args.seed)
        print(f"generated {stats['files']} files ({stats['packages']} packages, {stats['unparsable']} unparsable, "
              f"{stats['non_utf8']} non-UTF-8, {stats['oversized']} oversized, 1 symlink loop) "
              f"in {time.perf_counter() - started:.1f}s, seed {args.seed}")
        plain = run_child(tree, trace=False)
        traced = run_child(tree, trace=True)
        files = plain["modules"] + plain["skipped"]
        print(f"discovery: {plain['wall_s']:.2f}s wall, {files / plain['wall_s']:.0f} files/s "
              f"({plain['modules']} modules read, {plain['skipped']} skipped), "
              f"{plain['classes']} classes, {plain['aliases']} aliases")
        print(f"roles: {plain['roles']}; candidate groups: {plain['candidate_groups']}; "
              f"draft {plain['yaml_bytes']} bytes")
        print(f"peak RSS of the discovery process: {plain['peak_rss_mb']:.1f} MB; "
              f"tracemalloc peak (Python heap, separate run at {traced['wall_s']:.2f}s): "
              f"{traced['tracemalloc_peak_mb']:.1f} MB")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
