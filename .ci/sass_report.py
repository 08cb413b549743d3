"""The machine code of the histogram kernels' inner loops: instructions per candidate, from the
SASS that `cuobjdump -sass` prints for the compiled objects, and a budget that CI holds.
(The fused embedding kernels are listed too: their hot path is the binning, or the gradient, of
one step's scores; their matrix products are not counted.)

Usage: python .ci/sass_report.py SASS_FILE [--budget REGEX=N ...] [--wide REGEX]
       [--no-generic-access REGEX] [--require REGEX=OPCODE ...]

For each kernel the hot path is the basic block (a run of instructions without a branch in or
out) that bins or looks up the most candidates; each candidate's bin position is one float to
integer conversion (F2I) or one addition rounded down that replaces it (FADD.RM), so that count
is the number of candidates in the block. Reported per
kernel: the block's size, its candidates, instructions per candidate, and the width of its
global loads. The inner loops are straight-line code (masked, not branched), so this is what a
warp executes per step; the per-row and per-group work outside the block is not counted.

Why it matters (docs/design.md, section 5): an H200 issues about 1.0e12 warp instructions per
second and reads 4.2 TB/s, so a kernel that reads b bytes per candidate stays memory-bound only
below about 8 b instructions per candidate: 31 for the fp32 forward, 16 for bf16.

--budget REGEX=N fails when a kernel whose name matches REGEX spends more than N instructions
per candidate on its hot path, or has no such block; --wide REGEX fails when a kernel whose name
matches it (the fast kernels, which read a pair's two int64 labels at once) has no 16-byte load
there; --no-generic-access REGEX fails when a kernel whose name matches it loads or stores
through generic addresses (LD, ST) anywhere: the fused kernels keep their matrix operands and
score tiles in shared memory, which LDS / LDSM / STS reach directly (LDSM: 16 bytes a lane in one
instruction), and a generic access only after an address space test (docs/design.md, section
3b); --require REGEX=OPCODE fails when a kernel whose name matches REGEX has no instruction of
that opcode (HGMMA: the wgmma path of the fused forward, built for sm_90a), or when no kernel
matches.
"""

import argparse
import collections
import re
import sys

from ptxas_report import demangle, short  # this folder: run as python .ci/sass_report.py

FUNCTION = re.compile(r"\n\s*Function : (\S+)\n")
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
TARGET = re.compile(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)")


def basic_blocks(instructions):
    """Splits [(address, text)] at branches and branch targets."""
    targets = {int(m.group(1), 16) for _, t in instructions if (m := TARGET.search(t))}
    blocks, current = [], []
    for address, text in instructions:
        if address in targets and current:
            blocks.append(current)
            current = []
        current.append(text)
        if "BRA" in text or "EXIT" in text or "RET" in text:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def opcode(text):
    words = text.split()
    return words[1] if words[0].startswith("@") else words[0]


def is_candidate(op):
    """One per binned or looked-up candidate: its bin position's float to integer conversion
    (F2I), or the addition rounded down that takes its place (MagicFloor: FADD.RM, DADD.RM)."""
    return op.startswith("F2I") or op in ("FADD.RM", "DADD.RM")


def hot_block(instructions):
    """(size, candidates, widest global load in bytes) of the block with the most candidates."""
    best = None
    for block in basic_blocks(instructions):
        ops = [opcode(t) for t in block]
        candidates = sum(is_candidate(op) for op in ops)
        if candidates and (best is None or candidates > best[1]):
            widths = [int(m.group(1)) // 8 for op in ops if (m := re.match(r"LDG\.E\.(\d+)", op))]
            best = (len(block), candidates, max(widths, default=4))
    return best


def kernels(sass):
    parts = FUNCTION.split(sass)
    names = demangle(parts[1::2])
    for name, body in zip(names, parts[2::2]):
        yield short(name), [(int(a, 16), t) for a, t in INSTRUCTION.findall(body)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sass")
    parser.add_argument("--budget", action="append", default=[], metavar="REGEX=N")
    parser.add_argument("--wide", metavar="REGEX", help="kernels that must load 16 bytes at once")
    parser.add_argument("--no-generic-access", metavar="REGEX", help="kernels without LD, ST")
    parser.add_argument("--require", action="append", default=[], metavar="REGEX=OPCODE")
    args = parser.parse_args()
    required = []
    for item in args.require:
        pattern, _, op = item.rpartition("=")
        required.append([re.compile(pattern), op, 0])  # the last: kernels that matched
    wide = re.compile(args.wide) if args.wide else None
    no_generic = re.compile(args.no_generic_access) if args.no_generic_access else None
    budgets = []
    for item in args.budget:
        pattern, _, limit = item.rpartition("=")
        budgets.append((re.compile(pattern), float(limit)))
    with open(args.sass) as f:
        sass = f.read()

    rows, failures, seen = [], [], collections.Counter()
    for name, instructions in kernels(sass):
        if not re.search(r"soft_histogram|embedding_histogram", name) or "finalize" in name:
            continue
        found = hot_block(instructions)
        seen[name] += 1
        if seen[name] > 1:  # the same kernel for another architecture
            continue
        per = found[0] / found[1] if found else float("nan")
        rows.append((name, found, per))
        for pattern, limit in budgets:
            if not pattern.search(name):
                continue
            if found is None:
                failures.append(f"{name}: no block bins a candidate")
            elif per > limit:
                failures.append(f"{name}: {per:.1f} instructions per candidate > {limit:g}")
        if no_generic is not None and no_generic.search(name):
            generic = sum(opcode(t).split(".")[0] in ("LD", "ST") for _, t in instructions)
            if generic:
                failures.append(f"{name}: {generic} generic loads or stores (LD, ST)")
        for need in required:
            if need[0].search(name):
                need[2] += 1
                if not any(opcode(t).split(".")[0] == need[1] for _, t in instructions):
                    failures.append(f"{name}: no {need[1]} instruction")
        if wide is not None and wide.search(name) and (found is None or found[2] < 16):
            width = found[2] if found else 0
            failures.append(f"{name}: {width}-byte loads on the hot path, not 16")

    if not rows:
        failures.append("no score-matrix kernel in the listing")
    for pattern, op, matched in required:
        if not matched:
            failures.append(f"no kernel matches {pattern.pattern} (which must have {op})")
    print(f"{'kernel (hot path)':<66} {'instr':>6} {'cands':>6} {'per cand':>9} {'load B':>7}")
    for name, found, per in sorted(rows):
        size, candidates, width = found if found else (0, 0, 0)
        print(f"{name:<66} {size:>6} {candidates:>6} {per:>9.1f} {width:>7}")
    for line in failures:
        print(f"FAIL  {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
