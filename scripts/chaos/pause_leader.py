#!/usr/bin/env python3
"""SIGSTOP the leader for longer than the election timeout, then SIGCONT:
a new leader is elected meanwhile, the old one steps down when it wakes,
and nothing acknowledged is lost.

    scripts/chaos/pause_leader.py [PAUSE_SECONDS=3]"""

import sys
import time

from chaoslib import Cluster, Verdict, Writer, all_present

pause = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
v = Verdict("pause-leader")
with Cluster(3) as c:
    old = c.leader()
    w = Writer(c)
    w.start()
    time.sleep(0.5)
    c.pause(old)
    t0 = time.time()
    v.say(f"SIGSTOP leader {old} for {pause:.1f} s")
    others = [i for i in c.ids if i != old]
    new = c.leader(among=others, timeout=15)
    v.check(new != old, f"a new leader ({new}) was elected {1000 * (time.time() - t0):.0f} ms after the pause")
    after = w.first_ack_after(t0, timeout=15)
    v.check(after is not None, "writes went on during the pause")
    time.sleep(max(0.0, pause - (time.time() - t0)))
    c.resume(old)
    v.say(f"SIGCONT {old}")
    deadline = time.time() + 15
    stepped_down = False
    while time.time() < deadline:
        h = c.health(old)
        if h and h.get("role") == "follower" and h.get("leader_id") != old:
            stepped_down = True
            break
        time.sleep(0.05)
    v.check(stepped_down, f"the old leader {old} stepped down and follows {c.health(old) and c.health(old).get('leader_id')}")
    time.sleep(0.5)
    w.stop()
    names = [n for _, n in w.acked]
    v.say(f"{len(names)} writes acknowledged, errors {w.errors}")
    for node, gone in all_present(c, names).items():
        v.check(not gone, f"node {node} has all {len(names)} acknowledged writes (missing {gone[:5]})")
v.finish()
