#!/usr/bin/env python3
"""No import cycle in a Rust crate's src/ (modules depend one way).

Usage: import-cycles.py SRC_DIR. The same rule as the workplace's shared check:
a file is a module; `crate::` and `super::` paths are edges to the longest
existing module prefix; a folder module and its own direct child may use each
other; test modules are left out. Prints each cycle and exits 1 if there is any.
Kept in the repository so a clean clone checks it.
"""
import os
import re
import sys

src = sys.argv[1]
mods = {}
for root, _, files in os.walk(src):
    for f in files:
        if f.endswith(".rs"):
            rel = os.path.relpath(os.path.join(root, f), src)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            if rel not in (["lib"], ["main"]) and rel[-1] != "tests":
                mods["::".join(rel)] = os.path.join(root, f)
def strip_tests(text):
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)
def target(parts):
    for n in range(len(parts), 0, -1):
        if "::".join(parts[:n]) in mods:
            return "::".join(parts[:n])
edges = {m: set() for m in mods}
for m, path in mods.items():
    text = re.sub(r"//[^\n]*", "", strip_tests(open(path).read()))
    here = m.split("::")
    paths = [p.split("::") for p in re.findall(r"crate::((?:[a-z_][a-z0-9_]*::)*[A-Za-z_][A-Za-z0-9_]*)", text)]
    for sup, rest in re.findall(r"\b((?:super::)+)((?:[a-z_][a-z0-9_]*::)*[A-Za-z_][A-Za-z0-9_]*)", text):
        paths.append(here[: len(here) - sup.count("super::")] + rest.split("::"))
    for prefix, inner in re.findall(r"crate::((?:[a-z_][a-z0-9_]*::)*)\{([^}]*)\}", text, re.S):
        base = [p for p in prefix.split("::") if p]
        for item in re.split(r"[,\s]+", re.sub(r"\{[^}]*\}", "", inner)):
            if item and item != "self":
                paths.append(base + item.split("::"))
            elif item == "self":
                paths.append(base)
    for p in paths:
        t = target(p)
        pa, pb = (t or "").split("::"), here
        if t and t != m and not (pa == pb[:-1] or pb == pa[:-1]):
            edges[m].add(t)
sys.setrecursionlimit(10000)
index, low, stack, on, cycles = {}, {}, [], set(), []
def strong(v, counter=[0]):
    index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index:
            strong(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            cycles.append(sorted(comp))
for v in mods:
    if v not in index:
        strong(v)
for c in cycles:
    print("cycle:", ", ".join(c))
print(f"{len(mods)} modules, {len(cycles)} cycles")
sys.exit(1 if cycles else 0)
