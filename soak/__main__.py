"""``python -m soak --duration 300 --seed N --cns 2 --zones 3 --report PATH [--coordinator
[--coordinators 3 [--zookeeper HOSTS]]]``.

Prints the seed and the schedule first, so a failure can be replayed; exits 1
when an invariant fails.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

from soak import report
from soak.driver import SoakConfig, default_workdir, run_soak
from soak.faults import AGENT_KINDS, COORDINATOR_KINDS, FAULTS, STATIC_KINDS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m soak", description=__doc__)
    ap.add_argument("--duration", type=float, default=300.0,
                    help="seconds of load (300); it goes on while the last fault recovers")
    ap.add_argument("--seed", type=int, default=None, help="default: a new one, printed")
    ap.add_argument("--cns", type=int, default=2)
    ap.add_argument("--zones", type=int, default=3)
    ap.add_argument("--vms-per-cn", type=int, default=2)
    ap.add_argument("--coordinator", action="store_true",
                    help="run a coordinator too, and add its faults (add, drain, lose a zone; "
                         "kill the coordinator)")
    ap.add_argument("--coordinators", type=int, default=1,
                    help="with --coordinator: this many on one ZooKeeper chroot "
                         "(kill-coordinator kills the leader)")
    ap.add_argument("--zookeeper", default=None, metavar="HOST:PORT[,...]",
                    help="the ensemble for --coordinators > 1 (default: a private one)")
    ap.add_argument("--kinds", default=None,
                    help="comma-separated fault kinds (default: every kind of this mode: "
                         f"{', '.join(STATIC_KINDS)}; with --coordinator also "
                         f"{', '.join(k for k in COORDINATOR_KINDS if k not in STATIC_KINDS)}; "
                         f"the policy agents' kinds, in either mode: {', '.join(AGENT_KINDS)})")
    ap.add_argument("--agents", type=int, default=None,
                    help="CNs that also run `snapper agent` for one more VM each, on a "
                         "compressed clock (default: 1 when an agent kind is scheduled)")
    ap.add_argument("--gates", action="store_true",
                    help="every zone behind its own OpenSSH sshd gate, every stream through "
                         "it, the CNs pushing and restoring with OpenSSH's ssh")
    ap.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else None
    bad = [k for k in kinds or () if k not in FAULTS]
    if bad:
        ap.error(f"unknown fault kinds: {', '.join(bad)}")
    if args.coordinators > 1 and not args.coordinator:
        ap.error("--coordinators needs --coordinator")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    config = SoakConfig(duration=args.duration, seed=seed, cns=args.cns, zones=args.zones,
                        vms_per_cn=args.vms_per_cn, coordinator=args.coordinator,
                        coordinators=args.coordinators, zookeeper=args.zookeeper,
                        fault_kinds=kinds, agents=args.agents, gates=args.gates,
                        workdir=args.workdir or default_workdir())
    print(report.schedule_text(seed, config.make_schedule(), config.kinds()), flush=True)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:7.1f}s] {msg}", flush=True)

    result = asyncio.run(run_soak(config, log=log))
    doc = report.write(result, args.report)
    print(report.summary(doc))
    if args.report:
        print(f"report: {args.report}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
