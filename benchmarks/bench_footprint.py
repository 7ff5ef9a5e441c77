"""How many distinct cache lines one compiled HTTP check touches when the caches are cold (valgrind).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_footprint.py [--n 100] [--evict 8388608] [--top 12]
    .venv/bin/python benchmarks/bench_footprint.py --file callgrind.out  # report a kept run again

At 1,000 requests/s every check arrives after an idle gap that took the caches (bench_cold.py: 5.8 µs of
thread CPU hot, ~54 µs after 1 ms asleep); its cost then tracks the distinct memory it touches, code and
data, not its instructions. This counts that memory deterministically: the same check as bench_cold.py /
bench_breakdown.py (a real Envoy's recorded bytes, bench_envoy's ISSUE15_CONFIG, accounting on; each
check's slot released after it) runs N times under valgrind's callgrind with its cache simulator (I1/D1
32 KiB 8-way, LL 4 MiB 16-way, 64-byte lines), collecting only inside the compiled `data_received`
(`--toggle-collect`), with --evict bytes of other memory copied between two checks (outside the
collection) so each check starts with cold caches. 50 checks run first (warm-up, then gc.freeze(), whose
C function zeroes callgrind's counts: only the N measured checks are reported).
PYTHONHASHSEED is 0 unless set (string hashes, hence dict probes, the same in every run); what is left
varies by ~1% from run to run (addresses: which lines objects share).

Printed, per check: instructions (Ir); cold lines = last-level misses: code (ILmr), data read (DLmr),
data written (DLmw), and their total in lines and KB; then the modules (shared objects) and functions
with the most cold lines (self cost: a function's own lines, not its callees'). Only the compiled lane
is measured (the build's extensions must be in place: `python setup.py build_ext --inplace`). Needs
valgrind (`apt-get install valgrind`); ~1-2 minutes. `--keep FILE` keeps the callgrind output, which
`callgrind_annotate --sort=ILmr FILE` (or `--file FILE` here) reads again. `--rate-limit-headers
openai` (a comma-separated list, "" for none) adds the policy's `rate_limit_headers` to the config: what
each choice of header families costs.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHES = ["--I1=32768,8,64", "--D1=32768,8,64", "--LL=4194304,16,64"]
ENTRY = "*native_5_fast_*data_received"  # the compiled lane's data_received (its C wrapper)
WARMUP = 50
COLD = ("ILmr", "DLmr", "DLmw")


# -- the measured process (under valgrind) --------------------------------------------------------------


def child(n: int, evict: int, families: str | None = None, keys: int = 1, models: int = 1) -> int:
    """The checks, fed to the compiled protocol as bench_cold.py feeds them (`keys` > 1: that many keys
    round-robin, each seen once before the measured checks, as bench_envoy's 10,000-key scenario;
    `models` > 1: that many models named in turn, bench_breakdown.models_in_turn)."""
    import gc
    import tempfile

    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO))
    import bench_breakdown as bb

    from nexus_authz import native
    from nexus_authz.adapters import http_authz
    from nexus_authz.core import tokens
    from nexus_authz.core.model import Reason

    if native.http1 is None:
        print(
            f"bench_footprint: the compiled extensions are not in use (native path: {native.PATH}); "
            "build them with `python setup.py build_ext --inplace`",
            file=sys.stderr,
        )
        return 2
    from nexus_authz.adapters.http_native import CompiledAuthzProtocol

    tokens.warm_up()
    fx = bb.Fixtures()
    workdir = Path(tempfile.mkdtemp(prefix="nexus-footprint-"))
    secrets = bb.key_secrets(fx, keys)
    chosen = ", ".join(name for name in (families or "").split(",") if name)
    extra = "" if families is None else f"rate_limit_headers: [{chosen}]\n"
    engine = bb.build_engine(workdir, fx, secrets, extra)
    settings = engine.settings
    app = http_authz.HttpApp(
        engine, max_header_bytes=settings.max_header_bytes, max_body=settings.max_body_bytes
    )
    proto = CompiledAuthzProtocol(app)
    proto.connection_made(bb.Sink())  # type: ignore[arg-type]
    decisions = engine.decider.decisions
    admitted = decisions[Reason.OK]
    feed = proto.data_received
    warmup = max(WARMUP, keys)
    checks = bb.models_in_turn(bb.keyed_checks(fx, secrets, 0, n + warmup), models)
    src, dst = bytearray(evict // 2), bytearray(evict // 2)
    done = bb.after_check(engine, keys)
    for data, rid in checks[:warmup]:
        feed(data)
        done(rid)
    gc.collect()
    gc.freeze()
    for data, rid in checks[warmup:]:
        feed(data)  # the only code collected
        done(rid)
        if evict:
            dst[:] = src  # every line of both buffers: the simulated caches lose the check's lines
    allowed = decisions[Reason.OK] - admitted
    print(f"native path: {native.LABEL}; {allowed} of {n + warmup} checks admitted", file=sys.stderr)
    return 0 if allowed == n + warmup else 3


# -- reading callgrind's output ---------------------------------------------------------------------------

_NAMED = re.compile(r"^(ob|fl|fi|fe|fn|cob|cfi|cfl|cfn)=(?:\((\d+)\))?\s*(.*)$")


def parse(path: str) -> tuple[list[str], dict[tuple[str, str], list[int]]]:
    """Self cost per (object, function) of a callgrind output file: (event names, {(ob, fn): counts}).

    The format (valgrind's docs, "Callgrind Format Specification"): `events:` names the columns; `ob=` /
    `fn=` set the object and function that the cost lines after them belong to (`(id) name` the first
    time, `(id)` after: name compression); a cost line is a position (a number, `+n`, `-n` or `*`) and
    the events' counts (missing trailing ones are 0; `positions:` says how many position columns lead);
    the cost line after a `calls=` line is the call's
    inclusive cost, which is the callee's, not this function's: it is skipped."""
    events: list[str] = []
    names: dict[tuple[str, str], str] = {}
    costs: dict[tuple[str, str], list[int]] = defaultdict(list)
    ob = fn = "???"
    positions = 1
    after_call = False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line or line[0] == "#":
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                if after_call:
                    after_call = False
                    continue
                fields = line.split()
                row = costs[(ob, fn)]
                if len(row) < len(events):
                    row.extend([0] * (len(events) - len(row)))
                for i, v in enumerate(fields[positions : positions + len(events)]):
                    row[i] += int(v)
                continue
            if line.startswith("calls="):
                after_call = True
                continue
            if line.startswith("positions:"):
                positions = len(line.split(":", 1)[1].split())
                continue
            if line.startswith("events:"):
                events = line.split(":", 1)[1].split()
                continue
            m = _NAMED.match(line.rstrip("\n"))
            if m is None:
                continue
            kind, ident, name = m.groups()
            space = kind[-2:] if kind[-2:] in ("ob", "fn") else "fl"
            if ident is not None:
                if name:
                    names[(space, ident)] = name
                else:
                    name = names.get((space, ident), f"({ident})")
            if kind == "ob":
                ob = name
            elif kind == "fn":
                fn = name
    if not events:
        raise ValueError(f"{path}: not a callgrind output file (no events: line)")
    return events, dict(costs)


def module_of(ob: str) -> str:
    """A shared object's short name: `_fast` for .../_fast.cpython-311-x86_64-linux-gnu.so."""
    base = os.path.basename(ob)
    if base.startswith("libpython"):
        return "libpython"
    if base.startswith("libc.so") or base.startswith("libc-"):
        return "libc"
    return base.split(".", 1)[0] or ob


def report(paths: list[str], n: int, top: int, head: str = "", digits: int = 1) -> str:
    """The figures per check of one run: its output file and the parts dumped before it (a dump, e.g.
    `callgrind_control -d` from any process on the machine, starts a new part: the parts add up). `head`
    and `digits`: another unit's first words and decimals (bench_footprint_als.py: per entry)."""
    head = head or f"per check ({n} checks, caches evicted between checks)"
    d, t = f",.{max(digits - 1, 0)}f", f",.{digits}f"  # the headline's, the tables' decimals
    events: list[str] = []
    costs: dict[tuple[str, str], list[int]] = {}
    for path in paths:
        part_events, part = parse(path)
        missing = [e for e in ("Ir", *COLD) if e not in part_events]
        if missing:
            raise ValueError(f"{path}: no {', '.join(missing)} events (run with --cache-sim=yes)")
        if events and part_events != events:
            raise ValueError(f"{path}: not the events of {paths[0]}")
        events = part_events
        for where, row in part.items():
            into = costs.setdefault(where, [0] * len(events))
            for i, v in enumerate(row):
                into[i] += v
    at = {e: i for i, e in enumerate(events)}

    def get(row: list[int], e: str) -> int:
        return row[at[e]] if at[e] < len(row) else 0

    def cold(row: list[int]) -> int:
        return sum(get(row, e) for e in COLD)

    total = [0] * len(events)
    modules: dict[str, list[int]] = defaultdict(lambda: [0] * len(events))
    for (ob, _fn), row in costs.items():
        for i, v in enumerate(row):
            total[i] += v
            modules[module_of(ob)][i] += v
    lines = cold(total) / n
    out = [
        f"{head}: {get(total, 'Ir') / n:,.0f} instructions; "
        f"cold lines {lines:{d}} ({lines * 64 / 1024:{d}} KB): "
        f"code {get(total, 'ILmr') / n:{d}}, data read {get(total, 'DLmr') / n:{d}}, "
        f"data written {get(total, 'DLmw') / n:{d}}",
        "",
        "| module | cold lines | code | data read | data written | instructions |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in sorted(modules.items(), key=lambda kv: -cold(kv[1]))[:top]:
        out.append(
            f"| {name} | {cold(row) / n:{t}} | {get(row, 'ILmr') / n:{t}} | {get(row, 'DLmr') / n:{t}} "
            f"| {get(row, 'DLmw') / n:{t}} | {get(row, 'Ir') / n:,.0f} |"
        )
    out += [
        "",
        "| function (module) | cold lines | code | data read | data written | instructions |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (ob, fn), row in sorted(costs.items(), key=lambda kv: -cold(kv[1]))[:top]:
        out.append(
            f"| {fn} ({module_of(ob)}) | {cold(row) / n:{t}} | {get(row, 'ILmr') / n:{t}} "
            f"| {get(row, 'DLmr') / n:{t}} | {get(row, 'DLmw') / n:{t}} | {get(row, 'Ir') / n:,.0f} |"
        )
    return "\n".join(out)


# -- the driver -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=100, help="checks measured (after 50 of warm-up)")
    ap.add_argument("--evict", type=int, default=8 << 20, help="bytes copied between checks (0: hot)")
    ap.add_argument("--top", type=int, default=12, help="modules and functions listed")
    ap.add_argument(
        "--keep", metavar="FILE", help="keep callgrind's output here (FILE, FILE.1 ... if dumped in parts)"
    )
    ap.add_argument(
        "--file",
        metavar="FILE",
        nargs="+",
        help="report a kept callgrind output, all its parts (with its --n)",
    )
    ap.add_argument(
        "--rate-limit-headers",
        metavar="FAMILIES",
        help='the policy\'s rate_limit_headers, comma-separated (openai, ietf; "" for none); default: unset',
    )
    ap.add_argument(
        "--keys", type=int, default=1, help="keys round-robin (each seen once before the measured checks)"
    )
    ap.add_argument("--models", type=int, default=1, help="models named in turn (each its own plan; 1-26)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be at least 1")
    if not 1 <= args.models <= 26:
        ap.error("--models must be 1 to 26")
    if args.child:
        return child(args.n, args.evict, args.rate_limit_headers, args.keys, args.models)
    if args.file:
        return report_file("bench_footprint", lambda: report(args.file, args.n, args.top))
    valgrind = find_valgrind("bench_footprint")
    if valgrind is None:
        return 2
    return measure(
        "bench_footprint",
        valgrind,
        [f"--toggle-collect={ENTRY}"],
        [f"--n={args.n}", f"--evict={args.evict}", f"--keys={args.keys}", f"--models={args.models}"]
        + ([] if args.rate_limit_headers is None else [f"--rate-limit-headers={args.rate_limit_headers}"]),
        args.keep,
        lambda parts: report(parts, args.n, args.top),
    )


# -- running a measurement under callgrind (also bench_footprint_als.py's) -------------------------------


def report_file(prog: str, text: Callable[[], str]) -> int:
    """--file: print the report of a kept callgrind output; 2 (said why) when it cannot be read."""
    try:
        print(text())
    except (OSError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    return 0


def find_valgrind(prog: str) -> str | None:
    """valgrind's path, or None (said why: nothing can be measured)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print(
            f"{prog}: valgrind is not installed (it needs valgrind's callgrind tool: "
            "`apt-get install valgrind`); nothing measured",
            file=sys.stderr,
        )
    return valgrind


def measured_parts(out: str) -> list[str]:
    """The parts of callgrind output `out` from the last gc.freeze() on: the parts dumped before it (the
    warm-up, `Trigger: --dump-before=gc_freeze`) dropped; the later ones (a dump from elsewhere, e.g.
    `callgrind_control -d`) and `out` itself kept, in order."""
    numbered = glob.glob(out + ".*")
    parts = sorted(
        (p for p in numbered if p.rsplit(".", 1)[1].isdigit()), key=lambda p: int(p.rsplit(".", 1)[1])
    )
    parts.append(out)
    start = 0
    for i, part in enumerate(parts):
        with open(part, encoding="utf-8", errors="replace") as f:
            head = "".join(next(f, "") for _ in range(40))
        if "Trigger: --dump-before=gc_freeze" in head:
            start = i + 1
    return parts[start:]


def measure(
    prog: str,
    valgrind: str,
    toggles: Sequence[str],
    child_args: Sequence[str],
    keep: str | None,
    report_of: Callable[[list[str]], str],
) -> int:
    """Run `prog`'s own script with --child and `child_args` under callgrind's cache simulation, collecting
    only inside the `toggles` and from the last gc.freeze() on (the child's, after its warm-up), with
    PYTHONHASHSEED 0 unless set; print what the child said, then `report_of` the output's parts (a dump,
    e.g. `callgrind_control -d` from any process on the machine, starts a new part: the parts add up),
    kept at `keep` if given. 0, or 1 when the run or its reading failed."""
    with tempfile.TemporaryDirectory(prefix=f"nexus-{prog.removeprefix('bench_').replace('_', '-')}-") as tmp:
        out = os.path.join(tmp, "callgrind.out")
        cmd = [
            valgrind,
            "--tool=callgrind",
            "--cache-sim=yes",
            *CACHES,
            "--collect-atstart=no",
            *toggles,
            # everything before the last gc.freeze() (the child's, after its warm-up) goes to parts of its
            # own, dropped below: --zero-before left part of the warm-up's Ir, Dr and L1 misses in the
            # output's cost lines (its `totals:` over its `summary:`, ~3.1M instructions after a
            # 10,000-key warm-up); a dump does not
            "--dump-before=gc_freeze",
            f"--callgrind-out-file={out}",
            sys.executable,
            str(REPO / "benchmarks" / f"{prog}.py"),
            "--child",
            *child_args,
        ]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        env.setdefault("PYTHONHASHSEED", "0")  # the same dict probes run after run: figures that compare
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        said = [x for x in done.stderr.splitlines() if not x.startswith(("==", "--"))]
        if done.returncode != 0 or not os.path.exists(out):
            print("\n".join(said[-20:]), file=sys.stderr)
            print(f"{prog}: the measured run failed (exit {done.returncode})", file=sys.stderr)
            return 1
        print("\n".join(said))
        parts = measured_parts(out)
        if keep:
            for i, part in enumerate(parts[:-1], 1):
                shutil.copyfile(part, f"{keep}.{i}")
            shutil.copyfile(out, keep)
        try:
            print(report_of(parts))
        except ValueError as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
