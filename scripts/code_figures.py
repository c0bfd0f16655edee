#!/usr/bin/env python3
"""The shape of the code, as docs/architecture.md reports it: non-test lines per crate and
their share, files over 1,500 such lines, functions over 100 lines, and import circles
between the modules of each crate.

    python3 scripts/code_figures.py            # from the repository root

A line counts when it is not blank and not a comment; a file's `#[cfg(test)] mod` at the end
and the `tests/`, `benches/` and `examples/` folders do not count. A function's length runs
from its `fn` line to its closing brace. A module imports another when its code names
`crate::OTHER`; a circle is a strongly connected set of two or more modules.
"""

import os
import re
import sys

FILE_LIMIT = 1500
FN_LIMIT = 100


def rust_files(src):
    for root, _, files in os.walk(src):
        for f in sorted(files):
            if f.endswith(".rs"):
                yield os.path.join(root, f)


def without_tests(lines):
    """The lines before a trailing `#[cfg(test)] mod ...`."""
    for i, line in enumerate(lines):
        if line.startswith("#[cfg(test)]") and i + 1 < len(lines) and lines[i + 1].startswith("mod "):
            return lines[:i]
    return lines


def code_lines(lines):
    return [l for l in lines if l.strip() and not l.strip().startswith("//")]


FN = re.compile(r"^(\s*)(pub(\([^)]*\))? )?(const )?(unsafe )?fn (\w+)")


def long_functions(path, lines):
    found = []
    for i, line in enumerate(lines):
        m = FN.match(line)
        if not m or line.rstrip().endswith(";"):
            continue
        indent = m.group(1)
        for j in range(i + 1, len(lines)):
            if lines[j] == indent + "}":
                if j - i > FN_LIMIT:
                    found.append((j - i, path, m.group(6)))
                break
    return found


def modules(src):
    """Each top-level module of a crate and the crate modules its code names."""
    files = {}
    for entry in sorted(os.listdir(src)):
        path = os.path.join(src, entry)
        if entry.endswith(".rs") and entry not in ("lib.rs", "main.rs"):
            files.setdefault(entry[:-3], []).append(path)
        elif os.path.isdir(path):
            # `NAME.rs` and its folder `NAME/` are one module.
            files.setdefault(entry, []).extend(rust_files(path))
    mods = {}
    for name, paths in files.items():
        text = "\n".join(
            "\n".join(code_lines(without_tests(open(f).read().split("\n")))) for f in paths
        )
        mods[name] = set(re.findall(r"crate::(\w+)", text)) - {name}
    for name in mods:
        mods[name] &= set(mods)
    return mods


def circles(graph):
    """Strongly connected sets of two or more nodes (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    crates = sorted(c for c in os.listdir(".") if c.startswith("slim-") and os.path.isdir(c + "/src"))
    per_crate, big_files, long_fns, all_circles = {}, [], [], []
    for c in crates:
        n = 0
        for f in rust_files(c + "/src"):
            lines = without_tests(open(f).read().split("\n"))
            k = len(code_lines(lines))
            n += k
            if k > FILE_LIMIT:
                big_files.append((k, f))
            long_fns += long_functions(f, lines)
        per_crate[c] = n
        all_circles += [(c, s) for s in circles(modules(c + "/src"))]
    total = sum(per_crate.values())
    print("| crate | non-test lines | share |")
    print("|---|---:|---:|")
    for c, n in per_crate.items():
        print(f"| {c} | {n:,} | {100 * n / total:.1f}% |")
    print(f"| all | {total:,} | |")
    print()
    print(f"files over {FILE_LIMIT:,} non-test lines: {len(big_files)}")
    for k, f in sorted(big_files, reverse=True):
        print(f"- {f}: {k:,}")
    print()
    print(f"functions over {FN_LIMIT} lines: {len(long_fns)}")
    for k, f, name in sorted(long_fns, reverse=True)[:10]:
        print(f"- {f}: `{name}`, {k}")
    if len(long_fns) > 10:
        print(f"- and {len(long_fns) - 10} more")
    print()
    print(f"import circles: {len(all_circles)}")
    for c, s in all_circles:
        print(f"- {c}: {' <-> '.join(s)}")


if __name__ == "__main__":
    main()
